"""export(): checkpoint folder → model.onnx + data, genai_config, tokenizer, manifest, atomically."""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import onnx_ir as ir

from phi_onnx.errors import OutputExistsError, PhiOnnxError
from phi_onnx.export.genai_config import genai_config
from phi_onnx.export.options import ExportOptions
from phi_onnx.export.registry import builder_for
from phi_onnx.source.checkpoint import Checkpoint, file_sha256
from phi_onnx.source.config import load_config
from phi_onnx.source.hub import TOKENIZER_FILES, ResolvedSource, resolve_source
from phi_onnx.source.models import find_known_model

log = logging.getLogger(__name__)

MANIFEST = "phi_onnx.json"
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
        overwrite: replace an existing output folder.
        revision: hub revision (branch, tag or commit) when `source` is on the hub.
        progress: show a progress bar on stderr while weights are written.

    Raises:
        PhiOnnxError: for any problem with the input; nothing is left behind.
    """
    options = options or ExportOptions()
    target = Path(output).expanduser().resolve()
    if target.exists() and not overwrite:
        raise OutputExistsError(f"Output folder {target} already exists.",
                                hint="Pass --overwrite (overwrite=True) to replace it, or choose another folder.")
    started = time.perf_counter()
    known = find_known_model(str(source)) if not Path(source).expanduser().is_dir() else None
    if known is not None:
        builder_for(known.architecture)  # refuses a model we cannot build before downloading it
    resolved = resolve_source(str(source), revision=revision)
    cfg = load_config(resolved.path)
    builder_cls = builder_for(cfg.architecture)
    checkpoint = Checkpoint(resolved.path)
    weights_hash = _Background(checkpoint.sha256)  # reads the whole checkpoint; overlap it with the build
    builder = builder_cls(cfg, checkpoint, options)
    model = builder.build()

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        _save(model, staging, progress=progress)
        _copy_tokenizer(resolved.path, staging)
        builder.write_assets(resolved.path, staging)
        (staging / "genai_config.json").write_text(
            json.dumps(genai_config(cfg, options, builder_cls.genai_type), indent=4) + "\n")
        op_counts = dict(sorted(Counter(
            (n.domain + "." if n.domain else "") + n.op_type for n in model.graph).items()))
        manifest = _manifest(resolved, weights_hash.result(), cfg.architecture, options, staging, op_counts)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _move_into_place(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    files = {p.name: p.stat().st_size for p in sorted(target.iterdir())}
    return ExportResult(target, str(source), cfg.architecture, options, time.perf_counter() - started,
                        files, op_counts)


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


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for dist in ("phi-onnx", "onnx", "onnx-ir", "onnxruntime", "onnxruntime-gpu", "onnxruntime-genai",
                 "onnxruntime-genai-cuda", "numpy"):
        try:
            found[dist] = version(dist)
        except PackageNotFoundError:
            continue
    return found


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
        "tools": _versions(),
        "graph": {"op_counts": op_counts},
        "files": {p.name: file_sha256(p) for p in sorted(folder.iterdir()) if p.is_file()},
        "verification": None,
    }


def _move_into_place(staging: Path, target: Path) -> None:
    """Swap the finished folder in; an old output is kept aside until the swap succeeded."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        target.rename(old)
    try:
        staging.rename(target)
    except BaseException:
        if old is not None:
            old.rename(target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
