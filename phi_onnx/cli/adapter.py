"""`phi-onnx adapter add/rm/list`: the switchable LoRA adapters of an export."""

from __future__ import annotations

import json

import click

from phi_onnx.cli.errors import user_errors


@click.group()
def adapter() -> None:
    """Manage the switchable LoRA adapters of an export made with --adapter."""


@adapter.command(name="add")
@click.argument("folder", type=click.Path(file_okay=False))
@click.argument("spec", metavar="NAME=PATH")
@user_errors
def add(folder: str, spec: str) -> None:
    """Add the PEFT LoRA adapter at PATH to FOLDER as NAME (no re-export)."""
    from phi_onnx.export.lora import add_adapter
    from phi_onnx.source.adapter import adapter_names

    [(name, path)] = adapter_names([spec])
    record = add_adapter(folder, name, path)
    click.echo(f"Added adapter {name} (rank {record['rank']}, {record['modules']} layers) to {folder}.")


@adapter.command(name="rm")
@click.argument("folder", type=click.Path(file_okay=False))
@click.argument("name")
@user_errors
def rm(folder: str, name: str) -> None:
    """Remove adapter NAME from FOLDER."""
    from phi_onnx.export.lora import remove_adapter

    remove_adapter(folder, name)
    click.echo(f"Removed adapter {name} from {folder}.")


@adapter.command(name="list")
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable list.")
@user_errors
def list_(folder: str, as_json: bool) -> None:
    """List FOLDER's adapters."""
    from phi_onnx.export.lora import list_adapters

    adapters = list_adapters(folder)
    if as_json:
        click.echo(json.dumps(adapters, indent=2))
        return
    if not adapters:
        click.echo(f"{folder} has no adapters (it has LoRA inputs: `phi-onnx adapter add` adds some).")
    for name, entry in adapters.items():
        click.echo(f"{name}\trank {entry.get('rank')}\t{entry.get('source')}\tsha256 {str(entry.get('sha256'))[:12]}")
