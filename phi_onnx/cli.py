"""The `phi-onnx` command line."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

import click

from phi_onnx.errors import PhiOnnxError

F = TypeVar("F", bound=Callable[..., Any])


def user_errors(func: F) -> F:
    """Print PhiOnnxError as one paragraph (no traceback), exit 2; Ctrl-C exits 130."""
    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except PhiOnnxError as error:
            click.echo(f"Error: {error}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("Interrupted; nothing was written.", err=True)
            sys.exit(130)
    return wrapper  # type: ignore[return-value]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="phi-onnx")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def main(verbose: int) -> None:
    """Export Microsoft Phi checkpoints to optimized ONNX and run them with ONNX Runtime."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    # Plain messages for users (e.g. why CUDA was not used); logger names only when asked for detail.
    fmt = "%(message)s" if verbose == 0 else "%(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=level, format=fmt)
    logging.getLogger("phi_onnx").setLevel(min(level, logging.INFO))


@main.command()
@click.argument("source")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False),
              help="Folder to create (it appears only once the export is complete).")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int4"]), default="int4", show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Execution provider the model is built for.")
@click.option("--block-size", type=int, default=32, show_default=True, help="int4 block size (16..256).")
@click.option("--symmetric/--asymmetric", default=True, show_default=True, help="int4 zero points or not.")
@click.option("--accuracy-level", type=click.IntRange(0, 4), default=None,
              help="MatMulNBits accuracy level (default: 4 on CPU, 0 on CUDA).")
@click.option("--max-length", type=int, default=None,
              help="Default max_length in genai_config (default: min(context, 4096)).")
@click.option("--revision", default=None, help="Hub revision (branch, tag or commit).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary.")
@user_errors
def export(source: str, output: str, precision: str, device: str, block_size: int, symmetric: bool,
           accuracy_level: int | None, max_length: int | None, revision: str | None, overwrite: bool,
           as_json: bool) -> None:
    """Export SOURCE (short name, hub id or local folder) to an ONNX model folder."""
    from phi_onnx.export import ExportOptions
    from phi_onnx.export import export as run_export

    options = ExportOptions(precision=precision, device=device, block_size=block_size,  # type: ignore[arg-type]
                            symmetric=symmetric, accuracy_level=accuracy_level, max_length=max_length)
    result = run_export(source, output, options, overwrite=overwrite, revision=revision,
                        progress=not as_json and sys.stderr.isatty())
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    size = sum(result.files.values()) / 1e6
    click.echo(f"Exported {source} ({result.architecture}) as {options.variant()} to {result.output} "
               f"in {result.seconds:.1f} s, {size:.1f} MB.")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable list.")
def models(as_json: bool) -> None:
    """List the short model names, their hub ids, and which are supported today."""
    from phi_onnx.export.registry import PLANNED, is_supported
    from phi_onnx.models import KNOWN_MODELS

    rows = [{"name": m.name, "aliases": list(m.aliases), "hub_id": m.hub_id, "architecture": m.architecture,
             "supported": is_supported(m.architecture),
             "note": m.description if is_supported(m.architecture) else PLANNED.get(m.architecture, "")}
            for m in KNOWN_MODELS]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    width = max(len(r["name"]) + sum(len(a) + 2 for a in r["aliases"]) for r in rows) + 2
    for r in rows:
        name = r["name"] + "".join(f", {a}" for a in r["aliases"])
        status = "yes" if r["supported"] else "not yet"
        click.echo(f"{name:<{width}} {r['hub_id']:<38} {status:<8} {r['note']}")


from phi_onnx.runtime.commands import bench, chat, generate  # noqa: E402 - registered after the group exists

for _command in (chat, generate, bench):
    main.add_command(_command)
