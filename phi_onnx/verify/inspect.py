"""`phi-onnx inspect`: what an export folder holds and where it came from, read without loading weights."""

from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any

from phi_onnx.manifest import ManifestError, manifest_path, read_manifest
from phi_onnx.paths import expand_user
from phi_onnx.runtime.errors import ModelFolderError

log = logging.getLogger(__name__)

#: The fused ONNX Runtime ops a phi-onnx graph uses; `inspect` says which are present (an export from
#: another tool, or a build without them, shows up as missing).
#: Matched by op type alone: ONNX Runtime registers SimplifiedLayerNormalization in the default domain.
FUSED_OPS: tuple[str, ...] = (
    "GroupQueryAttention",
    "SkipSimplifiedLayerNormalization",
    "SimplifiedLayerNormalization",
    "MatMulNBits",
    "RotaryEmbedding",
)


def _load_graph(folder: Path) -> Any:
    import onnx
    from google.protobuf.message import DecodeError

    path = folder / "model.onnx"
    if not path.is_file():
        raise ModelFolderError(f"{folder} has no model.onnx.",
                               hint="Pass a folder written by `phi-onnx export SOURCE -o FOLDER`.")
    if path.stat().st_size == 0:
        raise ModelFolderError(f"{path} is empty (0 bytes), not an ONNX model.", hint="Export again with --overwrite.")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, OSError, ValueError, RuntimeError) as error:
        raise ModelFolderError(f"{path} is not a valid ONNX model ({error}).",
                               hint="Export again with --overwrite.") from error
    if not model.graph.node or not model.ir_version:
        # protobuf reads many byte strings as a valid but empty message
        raise ModelFolderError(f"{path} is not a valid ONNX model (it holds no graph).",
                               hint="Export again with --overwrite.")
    return model


def op_histogram(model: Any) -> dict[str, int]:
    """Count of each op, as `domain.op` for non-default domains (main graph only)."""
    return dict(sorted(Counter((n.domain + "." if n.domain and n.domain != "ai.onnx" else "") + n.op_type
                               for n in model.graph.node).items()))


def _precision_of(model: Any) -> str:
    """Weight precision read from the graph: int4 when MatMulNBits packs the weights, else the float type
    of the largest initializer."""
    import onnx

    if any(n.op_type == "MatMulNBits" for n in model.graph.node):
        return "int4"
    sizes: Counter[int] = Counter()
    for init in model.graph.initializer:
        count = 1
        for dim in init.dims:
            count *= dim
        sizes[init.data_type] += count
    names = {onnx.TensorProto.FLOAT: "fp32", onnx.TensorProto.FLOAT16: "fp16", onnx.TensorProto.BFLOAT16: "bf16"}
    for dtype, _ in sizes.most_common():
        if dtype in names:
            return names[dtype]
    return "unknown"


def graph_precision(folder: str | os.PathLike[str]) -> str:
    """fp32, fp16, bf16 or int4, read from model.onnx (for folders without a manifest)."""
    return _precision_of(_load_graph(Path(folder)))


def _value_info(values: Any) -> list[dict[str, Any]]:
    import onnx

    out = []
    for value in values:
        tensor = value.type.tensor_type
        shape = [d.dim_param if d.dim_param else (d.dim_value if d.HasField("dim_value") else "?")
                 for d in tensor.shape.dim]
        out.append({"name": value.name, "dtype": onnx.TensorProto.DataType.Name(tensor.elem_type).lower(),
                    "shape": shape})
    return out


def inspect_folder(folder: str | os.PathLike[str], *, check_files: bool = False) -> dict[str, Any]:
    """Everything `phi-onnx inspect` shows, as a JSON-friendly dict.

    Keys: folder, precision, variant, files (name → bytes), size_bytes, op_counts, fused_ops (op → present),
    inputs, outputs, opsets, matmul_nbits_bits (bits → MatMulNBits nodes), source, options, tools, created,
    verification (None when never verified), quantization (the manifest's int4 record, mixed precision's
    choice per projection included; None without one);
    with `check_files`, file_check (`phi_onnx.verify.files.FileCheck.to_dict()`).
    """
    path = expand_user(folder, what="The export folder", error=ModelFolderError)
    if not path.is_dir():
        raise ModelFolderError(f"{path} is not a folder.",
                               hint="Pass a folder written by `phi-onnx export SOURCE -o FOLDER`.")
    model = _load_graph(path)
    try:
        manifest: dict[str, Any] = read_manifest(path) or {}
    except ManifestError as error:
        log.warning("%s; showing the graph only", error.message.rstrip("."))
        manifest = {}
    source, options, tools, verification, quantization = (
        _section(manifest, key, path) for key in ("source", "options", "tools", "verification", "quantization"))
    ops = op_histogram(model)
    files = {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.is_file()}
    info = {
        "folder": str(path.resolve()),
        "precision": str(options.get("precision") or _precision_of(model)),
        "variant": manifest.get("variant"),
        "files": files,
        "size_bytes": sum(files.values()),
        "op_counts": ops,
        "nodes": sum(ops.values()),
        "fused_ops": {op: any(name.split(".")[-1] == op for name in ops) for op in FUSED_OPS},
        "rotary_in_attention": any(n.op_type == "GroupQueryAttention" and any(
            a.name == "do_rotary" and a.i == 1 for a in n.attribute) for n in model.graph.node),
        "inputs": _value_info(model.graph.input),
        "outputs": _value_info(model.graph.output),
        "opsets": {(o.domain or "ai.onnx"): o.version for o in model.opset_import},
        "matmul_nbits_bits": _nbits_counts(model),
        "source": source or None,
        "options": options or None,
        "tools": tools or None,
        "created": manifest.get("created"),
        "has_manifest": bool(manifest),
        "verification": verification or None,
        "quantization": quantization or None,
    }
    if check_files:
        from phi_onnx.verify.files import check_files as run_check

        info["file_check"] = run_check(path).to_dict()
    return info


def _nbits_counts(model: Any) -> dict[str, int]:
    """How many MatMulNBits nodes have each weight width, e.g. {"4": 96, "8": 33} (empty without any)."""
    counts: Counter[str] = Counter()
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            counts[str(next((a.i for a in node.attribute if a.name == "bits"), 4))] += 1
    return dict(sorted(counts.items()))


def _section(manifest: dict[str, Any], key: str, folder: Path) -> dict[str, Any]:
    """One object of the manifest; a damaged one ({"options": 5}) is shown as absent, with a warning."""
    value = manifest.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        log.warning("%s: %r is %s, not an object; ignoring it", manifest_path(folder), key,
                    type(value).__name__)
        return {}
    return value


def human_size(num: float) -> str:
    """Bytes as B / KB / MB / GB (powers of 1000), as file listings show them."""
    for unit in ("B", "KB", "MB", "GB"):
        if num < 1000 or unit == "GB":
            return f"{num:.0f} {unit}" if unit == "B" else f"{num:.1f} {unit}"
        num /= 1000
    return f"{num:.1f} GB"


def _io_lines(title: str, values: list[dict[str, Any]], kv_prefix: str) -> list[str]:
    """A section listing graph inputs or outputs, the per-layer KV cache ones folded into their first."""
    cache = [v for v in values if v["name"].startswith(kv_prefix)]
    lines = [f"  {title}"]
    for value in values:
        if cache and value["name"].startswith(kv_prefix) and value is not cache[0]:
            continue
        suffix = f"  (x{len(cache)}: {kv_prefix}N.key/value)" if cache and value is cache[0] else ""
        lines.append(f"              {value['name']:<28} {value['dtype']:<8} {_shape(value['shape'])}{suffix}")
    return lines


def _shape(shape: list[Any]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def format_report(info: dict[str, Any]) -> str:
    """The human-readable form of `inspect_folder`'s result."""
    lines = [f"{info['folder']}",
             f"  precision   {info['precision']}" + (f"  (variant {info['variant']})" if info["variant"] else ""),
             f"  size        {human_size(info['size_bytes'])} in {len(info['files'])} files"]
    for name, size in info["files"].items():
        lines.append(f"              {name:<28} {human_size(size):>10}")
    fused = ", ".join(f"{op} {'yes' if present else 'no'}" for op, present in info["fused_ops"].items())
    lines.append(f"  fused ops   {fused}" + ("; rotary inside GroupQueryAttention" if info["rotary_in_attention"]
                                               else ""))
    lines.append(f"  ops ({info['nodes']} nodes)")
    for op, count in sorted(info["op_counts"].items(), key=lambda item: (-item[1], item[0])):
        lines.append(f"              {count:>6}  {op}")
    lines += _io_lines("inputs", info["inputs"], "past_key_values.")
    lines += _io_lines("outputs", info["outputs"], "present.")
    if not info["has_manifest"]:
        lines.append("  provenance  none (no phi_onnx.json: not written by phi-onnx, or written before it)")
    else:
        source = info["source"] or {}
        lines.append(f"  source      {source.get('spec')} ({source.get('architecture')})"
                     + (f", hub {source.get('hub_id')}" + (f"@{source['revision']}" if source.get("revision") else "")
                        if source.get("hub_id") else ""))
        lines.append(f"              path {source.get('path')}")
        lines.append(f"              weights sha256 {source.get('weights_sha256')}")
        options = info["options"] or {}
        lines.append("  options     " + ", ".join(f"{k}={v}" for k, v in options.items()))
        lines += _quantization_lines(info.get("quantization"), info.get("matmul_nbits_bits") or {})
        tools = info["tools"] or {}
        lines.append(f"  created     {info['created']} with " + ", ".join(f"{k} {v}" for k, v in tools.items()))
        lines.append("  verified    " + _verification_line(info["verification"]))
    check = info.get("file_check")
    if check is not None:
        if check["ok"]:
            lines.append(f"  files       OK: {len(check['checked'])} match the manifest's sha256")
        else:
            problems = [f"changed: {', '.join(check['changed'])}"] if check["changed"] else []
            problems += [f"missing: {', '.join(check['missing'])}"] if check["missing"] else []
            lines.append("  files       FAILED: " + "; ".join(problems))
    return "\n".join(lines)


def _quantization_lines(record: dict[str, Any] | None, bits: dict[str, int]) -> list[str]:
    """The int4 record: algorithm, tables, calibration, and mixed precision's choice per projection."""
    if not record:
        return []
    parts = [f"{record.get('algo')}, block {record.get('block_size')}, "
             f"{'symmetric' if record.get('symmetric') else 'asymmetric'}"]
    if "embeddings" in record:
        parts.append(f"embedding {record.get('embeddings')}, LM head {record.get('lm_head_bits')}-bit")
    calibration = record.get("calibration")
    if isinstance(calibration, dict):
        parts.append(f"calibrated on {calibration.get('tokens')} tokens ({calibration.get('source')})")
    lines = ["  int4        " + "; ".join(parts)]
    if bits:
        lines.append("              MatMulNBits " + ", ".join(f"{count} at {b} bits" for b, count in bits.items()))
    mix = record.get("mix")
    if isinstance(mix, dict) and isinstance(mix.get("tensors"), dict):
        tensors = mix["tensors"]
        eight = [key for key, t in tensors.items() if isinstance(t, dict) and t.get("bits") == 8]
        added, budget = mix.get("added_fraction"), mix.get("budget")
        size = (f" (+{added * 100:.1f} % of {budget * 100:g} % allowed)"
                if isinstance(added, (int, float)) and isinstance(budget, (int, float)) else "")
        lines.append(f"  mixed       {len(eight)} of {len(tensors)} projections at 8 bits{size}; the others at 4 "
                     "(--json lists each with its measured error):")
        for key in sorted(eight, key=lambda k: -_number(tensors[k].get("int4_error"))):
            lines.append(f"              {key:<44} int4 error {_number(tensors[key].get('int4_error')):.3g}")
    return lines


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) else 0.0


def _verification_line(record: dict[str, Any] | None) -> str:
    if not record:
        return "never (run `phi-onnx verify FOLDER`)"
    figures = record.get("figures") if isinstance(record.get("figures"), dict) else {}
    failed = record.get("failed") if isinstance(record.get("failed"), list) else []
    verdict = "PASSED" if record.get("passed") else "FAILED (" + ", ".join(map(str, failed)) + ")"
    shown = ", ".join(f"{name} {value:.4g}" for name, value in figures.items() if isinstance(value, (int, float))
                      if name in ("max_abs_logit_diff", "top1_agreement", "kl_divergence", "greedy_agreement",
                                  "perplexity_change"))
    reference = record["reference"].get("spec") if isinstance(record.get("reference"), dict) else None
    return f"{verdict} on {record.get('created')} against {reference}: {shown}"
