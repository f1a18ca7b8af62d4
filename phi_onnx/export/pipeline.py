"""export(): checkpoint folder → model.onnx + data, genai_config, tokenizer, manifest, atomically."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import onnx_ir as ir

from phi_onnx.errors import OutputWriteError, PhiOnnxError, SourceError
from phi_onnx.export.genai_config import genai_config
from phi_onnx.export.lora import SUFFIX, adapter_parameters, check_switchable, write_adapter_file, write_index
from phi_onnx.export.options import ExportOptions
from phi_onnx.export.output import check_target, staged_output
from phi_onnx.export.registry import builder_for
from phi_onnx.manifest import EXPORT_TOOLS, tool_versions, write_manifest
from phi_onnx.paths import expand_user
from phi_onnx.quantize.sequential import prepare_int4
from phi_onnx.source.adapter import LoraAdapter, MergedCheckpoint, read_adapter
from phi_onnx.source.checkpoint import Checkpoint, file_sha256
from phi_onnx.source.config import check_tensors, load_config
from phi_onnx.source.hub import TOKENIZER_FILES, ResolvedSource, resolve_source
from phi_onnx.source.models import find_known_model

log = logging.getLogger(__name__)

#: Copied too so other runtimes can read the model's shapes: Hugging Face Optimum's ORTModelForCausalLM
#: refuses a folder without config.json (see the README's "Optimum" section).
INTEROP_FILES = ("config.json",)


@dataclass
class ExportResult:
    """What an export produced."""

    output: Path
    source: str
    architecture: str
    options: ExportOptions
    seconds: float
    files: dict[str, int] = field(default_factory=dict)  # name → bytes
    op_counts: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary (the CLI's --json output)."""
        return {
            "output": str(self.output),
            "source": self.source,
            "architecture": self.architecture,
            "options": self.options.to_dict(),
            "variant": self.options.variant(),
            "seconds": round(self.seconds, 2),
            "files": self.files,
            "size_bytes": sum(self.files.values()),
            "op_counts": self.op_counts,
        }


def export(source: str | os.PathLike[str], output: str | os.PathLike[str], options: ExportOptions | None = None,
           *, overwrite: bool = False, revision: str | None = None, progress: bool = False) -> ExportResult:
    """Export a Phi checkpoint to an ONNX Runtime / onnxruntime-genai model folder.

    Args:
        source: a short name (`phi-3-mini`), a Hugging Face hub id, or a local checkpoint folder.
        output: the folder to create. It appears only once complete.
        options: precision, device and int4 settings (defaults: int4 for CPU).
        overwrite: replace a previous phi-onnx export at `output`, and nothing else (not the source, a folder
            holding it or the working directory, not a folder with other files: see `phi_onnx.export.output`).
        revision: hub revision (branch, tag or commit) when `source` is on the hub.
        progress: show a progress bar on stderr while weights are written.

    Raises:
        OutputExistsError: the output exists (or appeared meanwhile) and may not be replaced.
        OutputWriteError: the disk is full, read-only or not writable, or a parent of `output` is a file.
        PhiOnnxError: for any other problem with the input; nothing is left behind.
    """
    options = options or ExportOptions()
    if "\0" in os.fspath(output):
        raise OutputWriteError(f"The output path {os.fspath(output)!r} contains a NUL character.",
                               hint="Pass a plain folder path.")
    target = expand_user(output, what="The output folder", error=OutputWriteError).resolve()
    local = expand_user(source, what="The source", error=SourceError)
    known = find_known_model(os.fspath(source))  # a short name is the model, even beside a folder of that name
    early = [(local, "the source checkpoint")] if known is None and local.is_dir() else []
    # Checked first so that a refusal costs nothing; again once the source is resolved, and at the move.
    check_target(target, overwrite=overwrite, protected=[*early, (Path.cwd(), "the current directory")])
    started = time.perf_counter()
    # Adapters are read (and refused) before anything is downloaded or built.
    merged = read_adapter(options.merge_adapter) if options.merge_adapter else None
    switchable = [(name, read_adapter(path)) for name, path in options.adapters]
    if known is not None:
        builder_for(known.architecture)  # refuses a model we cannot build before downloading it
    resolved = resolve_source(str(source), revision=revision)
    protected = [(resolved.path, "the source checkpoint"), (Path.cwd(), "the current directory")]
    checked = check_target(target, overwrite=overwrite, protected=protected)
    cfg = load_config(resolved.path)
    builder_cls = builder_for(cfg.architecture)
    checkpoint = Checkpoint(resolved.path)
    check_tensors(cfg, checkpoint.names())  # before the builder allocates anything per layer
    if merged is not None:
        checkpoint = MergedCheckpoint(checkpoint, merged)  # every weight read (and quantized) is merged
    for _, adapter in switchable:
        adapter.check_base(checkpoint)
    weights_hash = _Background(checkpoint.sha256)  # reads the whole checkpoint; overlap it with the build
    log.info("Building the %s graph from %s as %s", cfg.architecture, resolved.path, options.variant())
    builder = builder_cls(cfg, checkpoint, options)
    model = builder.build()
    checkpoint.check_all_read(cfg.architecture, ignore=["lm_head.weight"] if cfg.tie_word_embeddings else [])
    if isinstance(checkpoint, MergedCheckpoint):
        checkpoint.check_applied(cfg.architecture)  # every adapter tensor is merged, or the export is refused
    targets = builder.lora.targets if builder.lora is not None else {}
    for _, adapter in switchable:
        check_switchable(adapter, targets)  # before GPTQ's calibration: a refusal costs nothing
    # GPTQ and mixed precision's measurements run here, before anything is written (a mix rebuilds the graph)
    quantization, model = prepare_int4(builder, resolved.path, model)
    targets = builder.lora.targets if builder.lora is not None else {}  # again: a mix rebuilt the graph
    # Computed before the staging folder exists: an adapter that does not fit leaves nothing behind.
    adapter_params = {name: adapter_parameters(adapter, targets, builder.w.np_dtype) for name, adapter in switchable}

    with staged_output(target, checked=checked, protected=protected,
                       needed=_size_estimate(model, resolved.path)) as staging:
        log.info("Writing model.onnx and its weights to %s", staging)
        _save(model, staging, progress=progress)
        _copy_tokenizer(resolved.path, staging)
        builder.write_assets(resolved.path, staging)
        (staging / "genai_config.json").write_text(
            json.dumps(genai_config(cfg, options, builder_cls.genai_type), indent=4) + "\n")
        if builder.lora is not None:
            for name, params in adapter_params.items():
                write_adapter_file(params, staging / f"{name}{SUFFIX}")
            write_index(staging, {"dtype": options.io_dtype, "targets": targets, "adapters": {
                name: adapter_record(name, adapter) for name, adapter in switchable}})
        op_counts = dict(sorted(Counter(
            (n.domain + "." if n.domain else "") + n.op_type for n in model.graph).items()))
        log.info("Hashing the source weights for the manifest")
        manifest = _manifest(resolved, weights_hash.result(), cfg.architecture, options, staging, op_counts)
        manifest["quantization"] = quantization
        if merged is not None:
            manifest["merged_adapter"] = adapter_record(None, merged)
        write_manifest(staging, manifest)
    files = {p.name: p.stat().st_size for p in sorted(target.iterdir())}
    return ExportResult(target, str(source), cfg.architecture, options, time.perf_counter() - started,
                        files, op_counts)


def adapter_record(name: str | None, adapter: LoraAdapter) -> dict[str, Any]:
    """What the manifest and adapters.json record of an adapter: where it came from and its sha256."""
    record: dict[str, Any] = {"source": str(adapter.path), "sha256": adapter.sha256(),
                              "rank": max(m.rank for m in adapter.modules.values()),
                              "modules": len(adapter.modules)}
    if name is not None:
        record["file"] = f"{name}{SUFFIX}"
    return record


class _Background:
    """Run `func` in a daemon thread (so Ctrl-C is not held up by it) and collect its result."""

    def __init__(self, func: Callable[[], str]) -> None:
        self._result: str | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(func,), daemon=True)
        self._thread.start()

    def _run(self, func: Callable[[], str]) -> None:
        try:
            self._result = func()
        except BaseException as error:  # handed to the caller in result()
            self._error = error

    def result(self) -> str:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result


def _save(model: ir.Model, folder: Path, *, progress: bool) -> None:
    """Write model.onnx and model.onnx.data, evaluating each lazy weight once, two at a time."""
    from tqdm import tqdm

    bar = tqdm(desc="writing weights", unit="tensor", disable=not progress, leave=False, file=sys.stderr)

    def callback(tensor: ir.TensorProtocol, info: Any) -> None:
        if bar.total is None:
            bar.total = info.total
        name = tensor.name or ""
        layer = next((part for part in name.split(".") if part.isdigit()), None)
        bar.set_postfix_str(f"layer {layer}" if layer is not None else name.split(".")[0], refresh=False)
        bar.update()

    try:
        ir.save(model, folder / "model.onnx", external_data="model.onnx.data", callback=callback,
                max_workers=2, max_in_flight_bytes=512 * 1024 * 1024)
    except PhiOnnxError:
        raise
    finally:
        bar.close()


def _copy_tokenizer(source: Path, folder: Path) -> None:
    for name in TOKENIZER_FILES + INTEROP_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, folder / name)
    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer.model").is_file():
        log.warning("%s has no tokenizer files; the export will need one to generate text", source)


def _manifest(resolved: ResolvedSource, weights_sha256: str, architecture: str, options: ExportOptions,
              folder: Path, op_counts: dict[str, int]) -> dict[str, Any]:
    return {
        "format": 1,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": {
            "spec": resolved.spec,
            "path": str(resolved.path),
            "hub_id": resolved.hub_id,
            "revision": resolved.revision,
            "architecture": architecture,
            "weights_sha256": weights_sha256,
            "config_sha256": file_sha256(resolved.path / "config.json"),
        },
        "options": options.to_dict(),
        "variant": options.variant(),
        "tools": tool_versions(EXPORT_TOOLS),
        "graph": {"op_counts": op_counts},
        "files": {p.name: file_sha256(p) for p in sorted(folder.iterdir())
                  if p.is_file() and not p.name.startswith(".")},  # not the staging folder's marker
        "verification": None,
    }


def _size_estimate(model: ir.Model, source: Path) -> int:
    """Bytes the export will write: its initializers (sizes known before any is loaded) and copied files."""
    weights = sum(value.const_value.nbytes for value in model.graph.initializers.values()
                  if value.const_value is not None)
    copied = sum((source / name).stat().st_size for name in TOKENIZER_FILES + INTEROP_FILES
                 if (source / name).is_file())
    return weights + copied + 1024 * 1024  # the graph itself, the configs, the manifest
