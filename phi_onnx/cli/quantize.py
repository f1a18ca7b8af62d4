"""`phi-onnx quantize IN_FOLDER OUT_FOLDER`: int4 for an existing fp32/fp16 ONNX model folder."""

from __future__ import annotations

import json

import click

from phi_onnx.cli.errors import user_errors
from phi_onnx.cli.options import export_options


@click.command()
@click.argument("source", type=click.Path(file_okay=False, exists=True))
@click.argument("output", type=click.Path(file_okay=False))
@export_options(only=("algo", "block_size", "symmetric", "accuracy_level", "calibration", "calibration_tokens"),
                helps={"algo": "rtn round-to-nearest, clip per-block range search (no data), gptq (phi-onnx exports: "
                               "re-exports from the checkpoint its manifest records).",
                       "accuracy_level": "MatMulNBits accuracy level (default: 4 for fp32 models, 0 for fp16).",
                       "calibration": "Calibration text file for --algo gptq (default: a built-in text).",
                       "calibration_tokens": "At most this many calibration tokens for --algo gptq or --calibration "
                                             "(default 4096)."})
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary.")
@user_errors(interrupted="Interrupted; the output folder was not created.")
def quantize(source: str, output: str, algo: str, block_size: int, symmetric: bool, accuracy_level: int | None,
             calibration: str | None, calibration_tokens: int | None, as_json: bool) -> None:
    """Write an int4 copy of the ONNX model in SOURCE into the new folder OUTPUT.

    Every MatMul with a constant weight becomes MatMulNBits; SOURCE is never modified, and OUTPUT
    must not exist.
    """
    from phi_onnx.quantize.onnx_model import quantize_folder

    result = quantize_folder(source, output, algo=algo, block_size=block_size, symmetric=symmetric,
                             accuracy_level=accuracy_level, calibration=calibration,
                             calibration_tokens=calibration_tokens)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    if result.reexported:
        click.echo(f"Exported {output} again from its checkpoint with {algo} int4 (block {block_size}).")
        return
    click.echo(f"Wrote {output}: {len(result.quantized)} MatMuls as int4 ({algo}, block {block_size})"
               + (f", {len(result.kept)} kept:" if result.kept else "."))
    for name, why in result.kept.items():
        click.echo(f"  {name}: {why}")
