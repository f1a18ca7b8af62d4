"""`phi-onnx quantize`: int4 for an existing fp32/fp16 ONNX model folder, written into a new folder.

Every `MatMul` whose second input is a constant 2-D float weight becomes a `MatMulNBits` with the
chosen algorithm's int4 weight (rtn or clip: per weight, no data needed). Other MatMuls (both
inputs computed, batched weights) stay as they are and are counted in the result. GPTQ needs each
layer's inputs as the quantized layers before it produce them, so it needs the model's layer
structure: for a phi-onnx export it re-exports from the checkpoint its manifest records (checked
by sha256); for other models it is refused with that reason.

The output folder must not exist; it is written beside it under a hidden name and renamed into
place when complete, and the input folder is never modified.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from phi_onnx.errors import OptionsError, OutputExistsError, OutputWriteError, UnsupportedModelError
from phi_onnx.export.graph import MS_DOMAIN
from phi_onnx.export.options import ALGOS
from phi_onnx.quantize.clip import quantize_clip
from phi_onnx.quantize.int4 import Int4Weight, quantize_int4

log = logging.getLogger(__name__)

FLOATS = {ir.DataType.FLOAT: np.float32, ir.DataType.FLOAT16: np.float16}


@dataclass
class QuantizeResult:
    """What `quantize_folder` wrote."""

    output: Path
    algo: str
    quantized: list[str] = field(default_factory=list)  # MatMul nodes now MatMulNBits
    kept: dict[str, str] = field(default_factory=dict)  # MatMul node → why it stayed
    reexported: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary."""
        return {"output": str(self.output), "algo": self.algo, "reexported": self.reexported,
                "quantized": len(self.quantized), "kept": self.kept}


def quantize_folder(source: str | Path, output: str | Path, *, algo: str = "rtn", block_size: int = 32,
                    symmetric: bool = True, accuracy_level: int | None = None,
                    calibration: str | None = None, calibration_tokens: int | None = None) -> QuantizeResult:
    """Write an int4 copy of the model folder `source` into the new folder `output`.

    `calibration` and `calibration_tokens` are `ExportOptions`' (for `gptq`, which re-exports).

    Raises:
        OptionsError, UnsupportedModelError, OutputExistsError: with the reason; nothing is written.
    """
    from phi_onnx.export.options import ExportOptions
    from phi_onnx.export.output import check_target, staged_output
    from phi_onnx.manifest import read_manifest
    from phi_onnx.paths import expand_user

    if "\0" in os.fspath(output):
        raise OutputWriteError(f"The output path {os.fspath(output)!r} contains a NUL character.",
                               hint="Pass a plain folder path.")
    src = expand_user(source, what="The input folder").resolve()
    target = expand_user(output, what="The output folder").resolve()
    if not (src / "model.onnx").is_file():
        raise OptionsError(f"{src} has no model.onnx.", hint="Pass a folder holding an fp32 or fp16 ONNX model.")
    if algo not in ALGOS:
        raise OptionsError(f"Unknown int4 algorithm {algo!r}.", hint=f"Choose one of: {', '.join(ALGOS)}.")
    checked = ExportOptions(block_size=block_size, accuracy_level=accuracy_level, algo=algo,  # type: ignore[arg-type]
                            calibration=calibration, calibration_tokens=calibration_tokens)  # export's validation
    if target == src or src in target.parents:
        raise OptionsError(f"The output {target} is inside the input folder.", hint="Choose a new folder elsewhere.")
    manifest = read_manifest(src)
    try:
        check_target(target, overwrite=False, protected=[(src, "the input model")])
    except OutputExistsError as error:  # its hint is export's --overwrite, which quantize does not have
        raise OutputExistsError(error.message, hint="Choose a new output folder; quantize never replaces one."
                                ) from None
    if checked.calibrates:
        return _reexport(src, target, manifest, algo, block_size, symmetric, accuracy_level, calibration,
                         calibration_tokens)
    model = _load(src)
    if any(n.op_type == "MatMulNBits" for n in model.graph):
        raise UnsupportedModelError(f"{src / 'model.onnx'} is already quantized (it has MatMulNBits).",
                                    hint="Quantize the fp32 or fp16 model it was made from.")
    device = (manifest or {}).get("options", {}).get("device") if isinstance(manifest, dict) else None
    result = QuantizeResult(target, algo)
    _replace_matmuls(model, result, algo, block_size, symmetric, accuracy_level, device)
    if not result.quantized:
        raise UnsupportedModelError(f"{src / 'model.onnx'} has no MatMul with a constant float weight to quantize "
                                    f"({len(result.kept)} MatMuls, none eligible).",
                                    hint="Only MatMul nodes whose second input is a 2-D initializer can become int4.")
    with staged_output(target, protected=[(src, "the input model")]) as staging:
        ir.save(model, staging / "model.onnx", external_data="model.onnx.data")
        for item in sorted(src.iterdir()):
            if item.is_file() and not item.name.startswith("model.onnx") and item.name != "phi_onnx.json":
                shutil.copy2(item, staging / item.name)
        if isinstance(manifest, dict):
            _write_manifest(staging, manifest, src, algo, block_size, symmetric, result)
    return result


def _load(src: Path) -> ir.Model:
    """model.onnx of `src`, its weights left on disk; refuses a file that is not ONNX, and external data
    that is missing, too short, or outside the folder (read only once the weights are written, it would
    fail half way through with a library error)."""
    path = src / "model.onnx"
    try:
        model = ir.load(path)
    except OSError as error:
        raise OptionsError(f"Cannot read {path}: {error.strerror or error}.",
                           hint="Check the file's permissions, or pass another folder.") from error
    except Exception as error:  # protobuf's DecodeError and onnx_ir's checks: the file is not a valid ONNX model
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UnsupportedModelError(f"{path} is not a readable ONNX model ({first}).",
                                    hint="Pass a folder holding an fp32 or fp16 model.onnx saved by ONNX "
                                         "(onnx.save) or an exporter.") from None
    base = os.path.realpath(src)
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if not isinstance(tensor, ir.ExternalTensor):
            continue
        location = os.path.join(tensor.base_dir, tensor.location)
        real = os.path.realpath(location)
        where = f"{path} keeps tensor {tensor.name!r} in {str(tensor.location)!r}"
        if os.path.commonpath([base, real]) != base:
            raise UnsupportedModelError(f"{where}, outside its folder ({real}).",
                                        hint="Weights are read only from the model's own folder: move the data "
                                             "file in and save the model again pointing at it.")
        try:
            info = os.stat(real)
        except OSError as error:
            raise UnsupportedModelError(f"{where}, which cannot be read ({error.strerror}).",
                                        hint="Copy the model's data file(s) into its folder.") from error
        if not stat.S_ISREG(info.st_mode):
            raise UnsupportedModelError(f"{where}, which is not a file.",
                                        hint="Save the model again with its weights in a data file beside it.")
        if info.st_nlink > 1:  # onnx_ir refuses hard-linked data files (a way to read a file from elsewhere)
            raise UnsupportedModelError(f"{where}, a file with {info.st_nlink} hard links.",
                                        hint="Copy the data file (cp, not ln) so that the folder holds its own.")
        end = (tensor.offset or 0) + (tensor.length if tensor.length is not None else tensor.nbytes)
        if end > info.st_size:
            raise UnsupportedModelError(f"{where}, which ends at byte {info.st_size}, before the tensor does "
                                        f"({end}).", hint="The data file is truncated: copy it again.")
    return model


def _replace_matmuls(model: ir.Model, result: QuantizeResult, algo: str, block_size: int, symmetric: bool,
                     accuracy_level: int | None, device: str | None) -> None:
    graph = model.graph
    model.opset_imports.setdefault(MS_DOMAIN, 1)
    for node in list(graph):
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
            continue
        why = _ineligible(node)
        if why:
            result.kept[node.name or "?"] = why
            continue
        x, weight = node.inputs
        assert x is not None and weight is not None and weight.const_value is not None
        k, n = weight.const_value.shape.numpy()
        np_dtype = FLOATS[weight.const_value.dtype]
        level = accuracy_level if accuracy_level is not None else (
            4 if np_dtype == np.float32 and device != "cuda" else 0)
        blocks = -(-k // block_size)
        tensor = weight.const_value
        cache: dict[str, Int4Weight] = {}

        def quantized(tensor: Any = tensor, cache: dict[str, Int4Weight] = cache, np_dtype: Any = np_dtype
                      ) -> Int4Weight:
            if "q" not in cache:  # the parts are written one after another; keep it until the last
                w = np.ascontiguousarray(np.asarray(tensor.numpy(), dtype=np.float32).T)
                cache["q"] = quantize_int4(w, block_size, symmetric) if algo == "rtn" else \
                    quantize_clip(w, block_size, symmetric, scale_dtype=np_dtype)
            return cache["q"]

        base = weight.name or node.name
        parts = [_lazy(f"{base}_q4", ir.DataType.UINT8, (n, blocks, block_size // 2), lambda q: q.packed, quantized),
                 _lazy(f"{base}_scales", weight.const_value.dtype, (n * blocks,),
                       lambda q, d=np_dtype: q.scales.astype(d), quantized)]
        if not symmetric:
            parts.append(_lazy(f"{base}_zp", ir.DataType.UINT8, (n * ((blocks + 1) // 2),),
                               lambda q: q.zero_points, quantized))
        for value in parts:
            graph.register_initializer(value)
        new = ir.Node(MS_DOMAIN, "MatMulNBits", [x, *parts], name=node.name,
                      attributes=ir.convenience.convert_attributes(
                          {"K": int(k), "N": int(n), "bits": 4, "block_size": block_size, "accuracy_level": level}))
        graph.insert_before(node, new)
        old = node.outputs[0]
        new.outputs[0].type, new.outputs[0].shape = old.type, old.shape
        old.replace_all_uses_with(new.outputs[0], replace_graph_outputs=True)
        name = old.name
        old.name = f"{name}_replaced"
        new.outputs[0].name = name  # graph outputs (logits) keep their names
        graph.remove(node, safe=True)
        if not weight.uses() and weight.name in graph.initializers:
            graph.initializers.pop(weight.name)
        result.quantized.append(node.name or base)


def _ineligible(node: ir.Node) -> str | None:
    """Why a MatMul cannot become MatMulNBits (None: it can)."""
    weight = node.inputs[1]
    if weight is None or weight.const_value is None:
        return "its weight is computed, not a constant"
    if weight.const_value.dtype not in FLOATS:
        return f"its weight is {weight.const_value.dtype.name}, not float32/float16"
    if len(weight.const_value.shape) != 2:
        return f"its weight has shape {list(weight.const_value.shape.numpy())}, not 2-D"
    return None


def _lazy(name: str, dtype: ir.DataType, shape: tuple[int, ...], select: Any, quantized: Any) -> ir.Value:
    lazy = ir.LazyTensor(lambda: ir.Tensor(np.ascontiguousarray(select(quantized())), name=name), dtype=dtype,
                         shape=ir.Shape(shape), name=name)
    return ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(shape), const_value=lazy)


def _write_manifest(staging: Path, manifest: dict[str, Any], src: Path, algo: str, block_size: int,
                    symmetric: bool, result: QuantizeResult) -> None:
    from phi_onnx.manifest import write_manifest
    from phi_onnx.source.checkpoint import file_sha256

    data = dict(manifest)
    options = dict(data.get("options") or {})
    options.update(precision="int4", algo=algo, block_size=block_size, symmetric=symmetric)
    data["options"] = options
    device = options.get("device", "cpu")
    data["variant"] = f"{device}-int4-{algo if symmetric else algo + '-asym'}-block-{block_size}"
    data["quantization"] = {"algo": algo, "block_size": block_size, "symmetric": symmetric,
                            "quantized_from": str(src), "matmuls_quantized": len(result.quantized),
                            "matmuls_kept": result.kept}
    data["verification"] = None
    data["files"] = {p.name: file_sha256(p) for p in sorted(staging.iterdir()) if p.is_file()
                     and not p.name.startswith(".")}
    write_manifest(staging, data)


def _reexport(src: Path, target: Path, manifest: Any, algo: str, block_size: int, symmetric: bool,
              accuracy_level: int | None, calibration: str | None,
              calibration_tokens: int | None = None) -> QuantizeResult:
    """GPTQ (or calibrated clip) through export, from the checkpoint the manifest names."""
    from phi_onnx.export import ExportOptions, export
    from phi_onnx.export.output import is_export_manifest
    from phi_onnx.source.checkpoint import Checkpoint

    what = "GPTQ" if algo == "gptq" else "Calibrated clipping"
    if not is_export_manifest(manifest):
        raise UnsupportedModelError(
            f"{what} needs the model's layer structure (each layer is calibrated on the outputs of the quantized "
            f"layers before it); {src} is not a phi-onnx export, so that structure is unknown.",
            hint="Use --algo clip or --algo rtn (no calibration) for this model, or export the checkpoint with "
                 "phi-onnx export --precision int4 --algo gptq.")
    source = manifest.get("source") or {}
    checkpoint = Path(str(source.get("path", "")))
    if not (checkpoint / "config.json").is_file():
        raise OptionsError(f"{what} re-exports from the source checkpoint, and {checkpoint} is not there any more.",
                           hint="Export the checkpoint again with --precision int4 --algo gptq.")
    if Checkpoint(checkpoint).sha256() != source.get("weights_sha256"):
        raise OptionsError(f"The checkpoint at {checkpoint} changed since {src} was exported from it.",
                           hint="Export the checkpoint again with --precision int4 --algo gptq.")
    old = manifest.get("options") or {}
    # As the graph path: the embedding table is left as it was, and every MatMul (the LM head's too) becomes
    # 4-bit MatMulNBits.
    options = ExportOptions(precision="int4", algo=algo, block_size=block_size, symmetric=symmetric,  # type: ignore[arg-type]
                            accuracy_level=accuracy_level, device=old.get("device", "cpu"),
                            max_length=old.get("max_length"), calibration=calibration,
                            calibration_tokens=calibration_tokens, embeddings="full", lm_head_bits=4)
    export(checkpoint, target, options)
    return QuantizeResult(target, algo, reexported=True)
