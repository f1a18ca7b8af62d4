"""The local export store: run a model by name, exported once into `$PHI_ONNX_HOME` and reused.

`resolve_model("phi-3-mini")` returns an export folder: the argument itself when it already is one
(model.onnx + genai_config.json), else the store entry for that source and those options, exported
on first use. Layout under the store root (`$PHI_ONNX_HOME`, default `~/.cache/phi-onnx`):

    models/<id>/          an export folder (phi_onnx.json names its source and options)
    entries/<id>.json     the store's record: name, source, variant, and the stamps that find it
    locks/<key>.lock      held while one source+options pair is being exported

An entry's id is the hash of the source's weights (`weights_sha256` from the export's manifest), its
config, the options and the phi-onnx version, so the same weights reached by another path share one
entry. Finding an entry must not re-read gigabytes of weights, so a lookup uses a *stamp* instead: the
source's resolved path plus each weight/config file's size and modification time (for the Hugging Face
cache the resolved path holds the commit hash and the files are content-addressed blobs). A changed
stamp means an export, which hashes the weights once anyway.

Concurrent first runs take the key's lock: one exports, the others wait and then find its entry. The
export goes to a `.pending-<key>` folder that is renamed to `models/<id>` (atomic), so a crash leaves
no half entry; a stale pending folder is removed by the next run that holds the lock.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from phi_onnx.errors import PhiOnnxError
from phi_onnx.manifest import read_manifest

if TYPE_CHECKING:
    from phi_onnx.export.options import ExportOptions

log = logging.getLogger(__name__)

HOME_ENV = "PHI_ONNX_HOME"
#: Files whose stat decides whether a source changed (weights and the config that shapes the graph).
_STAMP_PATTERNS = ("config.json", "*.safetensors", "*.safetensors.index.json", "tokenizer.json",
                   "tokenizer_config.json", "generation_config.json", "chat_template.jinja")
_LOCK_TIMEOUT_SECONDS = 6 * 3600  # a 14B export on a slow machine takes long; never wait forever
_REMOVING = ".removing-"  #: prefix of an entry folder being deleted by `rm`


class StoreError(PhiOnnxError):
    """The store cannot find, create or remove an entry."""


@dataclass(frozen=True)
class StoreEntry:
    """One exported model in the store."""

    id: str
    name: str
    variant: str
    folder: Path
    source: str
    created: str
    size_bytes: int
    verified: bool | None  # None: never verified; False: verification failed

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (`phi-onnx list --json`)."""
        return {"id": self.id, "name": self.name, "variant": self.variant, "folder": str(self.folder),
                "source": self.source, "created": self.created, "size_bytes": self.size_bytes,
                "verified": self.verified}


def store_root() -> Path:
    """The store's folder: `$PHI_ONNX_HOME`, else `~/.cache/phi-onnx`."""
    configured = os.environ.get(HOME_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "phi-onnx"


def is_export_folder(path: Path) -> bool:
    """Whether `path` looks like an export (what the runtime loads) rather than a checkpoint."""
    return path.is_dir() and (path / "model.onnx").is_file() and (path / "genai_config.json").is_file()


def _is_checkpoint_folder(path: Path) -> bool:
    """A folder with config.json that holds no export (an export keeps a copy of config.json)."""
    markers = ("model.onnx", "genai_config.json", "phi_onnx.json")
    return path.is_dir() and (path / "config.json").is_file() and not any((path / m).exists() for m in markers)


def default_export_options(device: str = "auto", precision: str | None = None) -> ExportOptions:
    """Export options for running on this machine: int4 on CPU, or on CUDA when it really works.

    `device` is the run-time choice (auto, cpu, cuda, cuda:N); auto targets CUDA only when a session
    really runs there (see `phi_onnx.runtime.providers.probe_cuda`).
    """
    from phi_onnx.export.options import ExportOptions
    from phi_onnx.runtime.providers import parse_device

    kind, _ = parse_device(device)
    if kind == "cuda":
        from phi_onnx.runtime.providers import resolve_device

        resolve_device(device, "cuda")  # CUDA that cannot run is an error now, not after a long export
    if kind == "auto":
        from phi_onnx.runtime.providers import cuda_expected, probe_cuda

        kind = "cuda" if cuda_expected() and probe_cuda(0) is None else "cpu"
    return ExportOptions(precision=precision or "int4", device=kind)  # type: ignore[arg-type]


def resolve_model(model: str | os.PathLike[str], *, device: str = "auto", precision: str | None = None,
                  options: ExportOptions | None = None, revision: str | None = None,
                  notify: Callable[[str], None] | None = None, progress: bool = False) -> Path:
    """The export folder to run for `model`: the folder itself, a store entry's id, or a source to export.

    Args:
        model: an export folder (returned as is), a store entry id, or a source (short name, hub id,
            checkpoint folder) exported into the store on first use.
        device: the run-time device; picks the export's target when `options` is not given.
        precision: int4 (default), fp32 or fp16, when `options` is not given.
        options: the exact export options (overrides `device` and `precision`).
        revision: hub revision of the source.
        notify: called with one line for the user before a first-run export starts.
        progress: show the export's progress bar.

    Raises:
        PhiOnnxError: the source cannot be resolved or exported, or the store cannot be written.
    """
    path = Path(model).expanduser()
    spec = str(model)
    if path.exists():
        if not _is_checkpoint_folder(path):
            return path  # an export (or something the runtime will explain it cannot load)
    else:
        entry = _entry_by_id(spec)
        if entry is not None:
            return entry.folder
        if path.is_absolute() or spec.startswith((".", "~")):
            return path  # a folder that is not there: the runtime says so
    from phi_onnx.source.hub import resolve_source

    opts = options or default_export_options(device, precision)
    resolved = resolve_source(spec, revision=revision)
    stamp = source_stamp(resolved.path)
    key = _hash({"stamp": stamp, "options": opts.to_dict(), "version": _version()})[:16]
    found = _find(key)
    if found is not None:
        log.info("Using %s from the store (%s)", spec, found)
        return found
    root = store_root()
    for sub in ("models", "entries", "locks"):
        _mkdir(root / sub)
    from filelock import FileLock, Timeout

    lock = FileLock(str(root / "locks" / f"{key}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if notify:
            notify(f"Waiting for another phi-onnx process that is exporting {spec} into the store ...")
        try:
            lock.acquire(timeout=_LOCK_TIMEOUT_SECONDS)
        except Timeout as error:
            raise StoreError(f"Another process has held the store lock {lock.lock_file} for hours.",
                             hint="If no phi-onnx export is running, delete that lock file.") from error
    try:
        found = _find(key)  # the process we waited for made it
        if found is not None:
            return found
        if notify:
            notify(f"Exporting {spec} as {opts.variant()} into the store ({root}); later runs start at once.")
        return _export_entry(spec, resolved.path, resolved.hub_id, resolved.revision, stamp, key, opts,
                             revision=revision, progress=progress)
    finally:
        lock.release()


def source_stamp(folder: Path) -> dict[str, Any]:
    """What identifies a source folder without reading its weights: path, and each file's size and mtime."""
    files: dict[str, list[int]] = {}
    for pattern in _STAMP_PATTERNS:
        for file in sorted(folder.glob(pattern)):
            info = file.stat()  # follows the hub cache's symlinks to their blobs
            files[file.name] = [info.st_size, info.st_mtime_ns]
    return {"path": str(folder.resolve()), "files": files}


def list_entries() -> list[StoreEntry]:
    """Every complete entry in the store, oldest first."""
    folder = store_root() / "entries"
    entries = []
    for record_path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        entry = _entry_from_record(record_path)
        if entry is not None:
            entries.append(entry)
    return sorted(entries, key=lambda e: e.created)


def remove_entries(name_or_id: str) -> list[StoreEntry]:
    """Remove the entries whose id (or a unique id prefix of 4+ characters) or name matches; returns them.

    Only folders the store wrote are removed: each has a record in `entries/` and a phi-onnx manifest.

    Raises:
        StoreError: nothing matches, or an id prefix matches several entries.
    """
    entries = list_entries()
    matches = [e for e in entries if e.id == name_or_id or e.name == name_or_id]
    if not matches and len(name_or_id) >= 4:
        matches = [e for e in entries if e.id.startswith(name_or_id)]
        if len(matches) > 1:
            raise StoreError(f"{name_or_id!r} is the start of {len(matches)} store ids.",
                             hint="Give more of the id (see `phi-onnx list`).")
    if not matches:
        raise StoreError(f"No store entry is named {name_or_id!r} or has that id.",
                         hint="See `phi-onnx list` for the names and ids.")
    for leftover in (store_root() / "models").glob(f"{_REMOVING}*"):  # of an rm that was cut short
        shutil.rmtree(leftover, ignore_errors=True)
    for entry in matches:
        record = store_root() / "entries" / f"{entry.id}.json"
        record.unlink(missing_ok=True)  # first: a half-removed folder is then no longer an entry
        # Renamed out of its id before deletion: an rm cut short (Ctrl-C) must not leave a folder that still
        # has model.onnx and genai_config.json under the id, which a later export would take as complete.
        doomed = entry.folder.with_name(f"{_REMOVING}{entry.id}")
        try:
            os.rename(entry.folder, doomed)
        except OSError:
            doomed = entry.folder
        shutil.rmtree(doomed, ignore_errors=True)
    return matches


# -- internals -----------------------------------------------------------------------------------

def _export_entry(spec: str, source_path: Path, hub_id: str | None, hub_revision: str | None,
                  stamp: dict[str, Any], key: str, opts: ExportOptions, *, revision: str | None,
                  progress: bool) -> Path:
    from phi_onnx.export.pipeline import export

    root = store_root()
    pending = root / "models" / f".pending-{key}"
    if pending.exists():  # left by a run that died; we hold the key's lock, so nobody is writing it
        shutil.rmtree(pending, ignore_errors=True)
    export(spec, pending, opts, revision=revision, progress=progress)
    manifest = read_manifest(pending) or {}
    source = manifest.get("source") or {}
    entry_id = _hash({"weights": source.get("weights_sha256"), "config": source.get("config_sha256"),
                      "options": opts.to_dict(), "version": _version()})[:12]
    folder = root / "models" / entry_id
    from filelock import FileLock

    # Another lookup key (another path to the same weights) may be storing this entry right now.
    with FileLock(str(root / "locks" / f"{entry_id}.lock"), timeout=_LOCK_TIMEOUT_SECONDS):
        if is_export_folder(folder):  # the same weights under another path or stamp: keep the one we have
            shutil.rmtree(pending, ignore_errors=True)
        else:
            if folder.exists():  # an incomplete folder of our own naming (a crash while it was removed)
                shutil.rmtree(folder, ignore_errors=True)
            pending.rename(folder)
        record_path = root / "entries" / f"{entry_id}.json"
        record = _read_record(record_path) or {
            "id": entry_id, "name": spec, "variant": opts.variant(), "options": opts.to_dict(),
            "source": hub_id + (f"@{hub_revision}" if hub_revision else "") if hub_id else str(source_path),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "keys": []}
        if key not in record["keys"]:
            record["keys"].append(key)
        record.setdefault("stamps", {})[key] = stamp
        _write_json(record_path, record)
    log.info("Stored %s as %s in %s", spec, opts.variant(), folder)
    return folder


def _find(key: str) -> Path | None:
    """The complete entry a lookup key points to, or None."""
    folder = store_root() / "entries"
    for record_path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        record = _read_record(record_path)
        if record and key in record.get("keys", ()):
            entry = store_root() / "models" / str(record.get("id"))
            if is_export_folder(entry):
                return entry
    return None


def _entry_by_id(text: str) -> StoreEntry | None:
    if len(text) != 12 or any(c not in "0123456789abcdef" for c in text):
        return None
    path = store_root() / "entries" / f"{text}.json"
    return _entry_from_record(path) if path.is_file() else None


def _entry_from_record(record_path: Path) -> StoreEntry | None:
    record = _read_record(record_path)
    if not record or record.get("id") != record_path.stem:
        return None
    folder = store_root() / "models" / record_path.stem
    if not is_export_folder(folder):
        return None
    try:
        manifest = read_manifest(folder)
    except PhiOnnxError:
        manifest = {}
    if manifest is None:
        return None  # no phi-onnx manifest: not something the store wrote, so never listed or removed
    verification = manifest.get("verification")
    verified = bool(verification.get("passed")) if isinstance(verification, dict) else None
    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    return StoreEntry(id=record_path.stem, name=str(record.get("name", "")), variant=str(record.get("variant", "")),
                      folder=folder, source=str(record.get("source", "")), created=str(record.get("created", "")),
                      size_bytes=size, verified=verified)


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None  # a damaged record is not an entry; `rm` cannot match it and export rewrites it
    return data if isinstance(data, dict) else None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(json.dumps(data, indent=2) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temp, 0o666 & ~umask)  # mkstemp makes it 0600; a store is as readable as any cache
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def _mkdir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise StoreError(f"Cannot create the store folder {path} ({error.strerror or error}).",
                         hint=f"Set {HOME_ENV} to a writable folder, or pass an export folder instead.") from error


def _hash(data: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _version() -> str:
    from phi_onnx import __version__

    return __version__


__all__ = ["StoreEntry", "StoreError", "default_export_options", "is_export_folder", "list_entries",
           "remove_entries", "resolve_model", "source_stamp", "store_root"]
