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

Deleting: the store deletes only files it wrote, checked, never a folder tree. Those are the names an
entry's record lists (`files`, written with the entry) and its manifest lists, in a folder of the
store's own naming; anything else found there is reported and kept. `rm` renames an entry's folder to
`models/.removing-<id>` and writes the list of names it is about to delete into it
(`.phi-onnx-removing`), so an rm cut short is finished by the next one from that list. An entry whose
record, folder, manifest or listed files are missing or unreadable is *damaged*: `list` shows it as
such, `rm` removes it, and a run that finds it stops with an error naming it rather than using it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from phi_onnx.errors import PhiOnnxError
from phi_onnx.export.output import delete_written, is_export_manifest, manifest_files, written_files
from phi_onnx.manifest import MANIFEST, ManifestError, read_manifest
from phi_onnx.paths import expand_user

if TYPE_CHECKING:
    from phi_onnx.export.options import ExportOptions

log = logging.getLogger(__name__)

HOME_ENV = "PHI_ONNX_HOME"
#: Files whose stat decides whether a source changed (weights and the config that shapes the graph).
_STAMP_PATTERNS = ("config.json", "*.safetensors", "*.safetensors.index.json", "tokenizer.json",
                   "tokenizer_config.json", "generation_config.json", "chat_template.jinja")
_LOCK_TIMEOUT_SECONDS = 6 * 3600  # a 14B export on a slow machine takes long; never wait forever
_REMOVING = ".removing-"  #: prefix of an entry folder being deleted by `rm`
_REMOVAL_LIST = ".phi-onnx-removing"  #: inside such a folder: the names `rm` is deleting there
_ID = re.compile(r"[0-9a-f]{12}")  #: an entry id: what the store names its records and folders


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
    damaged: str | None = None  # why the entry cannot be used (None: it is complete)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (`phi-onnx list --json`)."""
        return {"id": self.id, "name": self.name, "variant": self.variant, "folder": str(self.folder),
                "source": self.source, "created": self.created, "size_bytes": self.size_bytes,
                "verified": self.verified, "damaged": self.damaged}


def store_root() -> Path:
    """The store's folder: `$PHI_ONNX_HOME`, else `~/.cache/phi-onnx`.

    Raises:
        StoreError: `$PHI_ONNX_HOME` starts with a `~user` that does not exist, or there is no home folder.
    """
    configured = os.environ.get(HOME_ENV)
    if configured:
        return expand_user(configured, what=f"${HOME_ENV}", error=StoreError)
    try:
        return Path.home() / ".cache" / "phi-onnx"
    except RuntimeError:
        raise StoreError("This process has no home folder ($HOME), so the store has no default place.",
                         hint=f"Set {HOME_ENV} to a folder for the store.") from None


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
    from phi_onnx.source.models import find_known_model

    spec = os.fspath(model)
    path = expand_user(spec, what="The model path", error=StoreError)
    # A bare short name means that model even beside a folder of the same name (`./NAME` is the folder):
    # what runs must not depend on the working directory. resolve_source says so when there is one.
    if find_known_model(spec) is None:
        if path.exists():
            if not _is_checkpoint_folder(path):
                return path  # an export (or something the runtime will explain it cannot load)
        else:
            entry = _entry_by_id(spec)
            if entry is not None:
                return _usable(entry)
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
    """Every entry in the store, oldest first, damaged ones included (their `damaged` says why)."""
    root = store_root()
    ids = set()
    if (root / "entries").is_dir():
        ids |= {path.stem for path in (root / "entries").glob("*.json") if _ID.fullmatch(path.stem)}
    if (root / "models").is_dir():
        ids |= {path.name for path in (root / "models").iterdir() if _ID.fullmatch(path.name)}
    entries = [entry for entry in map(_load_entry, sorted(ids)) if entry is not None]
    return sorted(entries, key=lambda e: e.created)


def remove_entries(name_or_id: str) -> list[StoreEntry]:
    """Remove the entries whose id (or a unique id prefix of 4+ characters) or name matches; returns them.

    Damaged entries are removed too. Only what the store wrote is deleted: an entry's record, and in its
    folder the files its record and manifest list; an entry whose folder holds anything else is refused,
    and nothing is removed then.

    Raises:
        StoreError: nothing matches, an id prefix matches several entries, or an entry's folder holds
            files that phi-onnx did not write.
    """
    entries = list_entries()
    matches = [e for e in entries if e.id == name_or_id or (e.name and e.name == name_or_id)]
    if not matches and len(name_or_id) >= 4:
        matches = [e for e in entries if e.id.startswith(name_or_id)]
        if len(matches) > 1:
            raise StoreError(f"{name_or_id!r} is the start of {len(matches)} store ids.",
                             hint="Give more of the id (see `phi-onnx list`).")
    if not matches:
        raise StoreError(f"No store entry is named {name_or_id!r} or has that id.",
                         hint="See `phi-onnx list` for the names and ids.")
    _finish_removals()
    plans = [(entry, _entry_files(entry, name_or_id)) for entry in matches]  # refuses before anything goes
    for entry, names in plans:
        (store_root() / "entries" / f"{entry.id}.json").unlink(missing_ok=True)  # first: no longer an entry
        if not os.path.lexists(entry.folder):
            continue
        # Renamed out of its id before deletion: an rm cut short (Ctrl-C) must not leave a folder that still
        # has model.onnx and genai_config.json under the id, which a later export would take as complete.
        doomed = entry.folder.with_name(f"{_REMOVING}{entry.id}")
        try:
            os.rename(entry.folder, doomed)
        except OSError:
            doomed = entry.folder
        # What the next rm deletes should this one be cut short (without it, that rm can delete less)
        with contextlib.suppress(OSError):
            _write_json(doomed / _REMOVAL_LIST, {"id": entry.id, "files": sorted(names)})
        left = delete_written(doomed, names | {_REMOVAL_LIST}, last=(MANIFEST, _REMOVAL_LIST))
        if left:  # a file that appeared meanwhile: kept
            log.warning("Left %s: it holds %s, which phi-onnx did not write.", doomed, ", ".join(left))
    return matches


# -- internals -----------------------------------------------------------------------------------

def _export_entry(spec: str, source_path: Path, hub_id: str | None, hub_revision: str | None,
                  stamp: dict[str, Any], key: str, opts: ExportOptions, *, revision: str | None,
                  progress: bool) -> Path:
    from phi_onnx.export.pipeline import export

    root = store_root()
    pending = root / "models" / f".pending-{key}"
    if os.path.lexists(pending):  # left by a run that died; we hold the key's lock, so nobody is writing it
        _clear(pending)
    export(spec, pending, opts, revision=revision, progress=progress)
    manifest = read_manifest(pending) or {}
    source = manifest.get("source") or {}
    entry_id = _hash({"weights": source.get("weights_sha256"), "config": source.get("config_sha256"),
                      "options": opts.to_dict(), "version": _version()})[:12]
    folder = root / "models" / entry_id
    from filelock import FileLock

    # Another lookup key (another path to the same weights) may be storing this entry right now.
    with FileLock(str(root / "locks" / f"{entry_id}.lock"), timeout=_LOCK_TIMEOUT_SECONDS):
        record_path = root / "entries" / f"{entry_id}.json"
        record = _read_record(record_path)
        if os.path.lexists(folder):  # the same weights under another path or stamp: keep the one we have
            _clear(pending)
            damage = _folder_damage(folder, record)
            if damage is not None:
                raise _damaged_error(entry_id, spec, damage)
        else:
            pending.rename(folder)
        if record is None or record.get("id") != entry_id:
            record = {
                "id": entry_id, "name": spec, "variant": opts.variant(), "options": opts.to_dict(),
                "source": hub_id + (f"@{hub_revision}" if hub_revision else "") if hub_id else str(source_path),
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "keys": []}
        if not isinstance(record.get("keys"), list):
            record["keys"] = []
        if key not in record["keys"]:
            record["keys"].append(key)
        if not isinstance(record.get("stamps"), dict):
            record["stamps"] = {}
        record["stamps"][key] = stamp
        # What `rm` may delete, kept apart from the manifest (a damaged entry may have lost that)
        record["files"] = sorted(manifest_files(read_manifest(folder)) | {MANIFEST})
        _write_json(record_path, record)
    log.info("Stored %s as %s in %s", spec, opts.variant(), folder)
    return folder


def _find(key: str) -> Path | None:
    """The entry a lookup key points to, or None; a damaged one is an error (its folder gone: None, exported again).

    Raises:
        StoreError: the entry is damaged.
    """
    folder = store_root() / "entries"
    for record_path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        record = _read_record(record_path)
        keys = record.get("keys") if record else None
        if isinstance(keys, list) and key in keys and _ID.fullmatch(record_path.stem):
            entry = _load_entry(record_path.stem)
            if entry is None or not os.path.lexists(entry.folder):
                return None  # nothing there to use or to keep: the export makes it again
            return _usable(entry)
    return None


def _entry_by_id(text: str) -> StoreEntry | None:
    return _load_entry(text) if _ID.fullmatch(text) else None


def _usable(entry: StoreEntry) -> Path:
    """The entry's folder, once it is known to be complete and loadable.

    Raises:
        StoreError: the entry is damaged (what the runtime finds wrong in its files included).
    """
    if entry.damaged:
        raise _damaged_error(entry.id, entry.name, entry.damaged)
    from phi_onnx.runtime.folder import ModelFolderError, read_folder

    try:
        read_folder(entry.folder)
    except ModelFolderError as error:  # its hint is `export --overwrite`, which does not apply to the store
        raise _damaged_error(entry.id, entry.name, error.message.rstrip(".")) from None
    return entry.folder


def _damaged_error(entry_id: str, name: str, why: str) -> StoreError:
    from phi_onnx.paths import printable

    named = f" ({printable(name)})" if name else ""
    return StoreError(f"The store entry {entry_id}{named} is damaged: {why}.",
                      hint=f"Remove it with `phi-onnx rm {entry_id}`, then run again to export it afresh.")


def _load_entry(entry_id: str) -> StoreEntry | None:
    """The entry with this id as found on disk (record and folder), damaged or not; None if neither exists."""
    root = store_root()
    record_path, folder = root / "entries" / f"{entry_id}.json", root / "models" / entry_id
    if not os.path.lexists(record_path) and not os.path.lexists(folder):
        return None
    record = _read_record(record_path)
    if record is not None and record.get("id") != entry_id:
        record = None
    if not os.path.lexists(record_path):
        damage: str | None = f"it has no record (entries/{entry_id}.json)"
    elif record is None:
        damage = f"its record entries/{entry_id}.json is unreadable"
    else:
        damage = _folder_damage(folder, record)
    try:
        manifest = read_manifest(folder) if folder.is_dir() else None
    except ManifestError:
        manifest = None
    verification = manifest.get("verification") if isinstance(manifest, dict) else None
    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) if folder.is_dir() else 0
    record = record or {}
    return StoreEntry(id=entry_id, name=str(record.get("name", "")), variant=str(record.get("variant", "")),
                      folder=folder, source=str(record.get("source", "")), created=str(record.get("created", "")),
                      size_bytes=size, verified=bool(verification.get("passed")) if isinstance(verification, dict)
                      else None, damaged=damage)


def _folder_damage(folder: Path, record: dict[str, Any] | None) -> str | None:
    """What is wrong with an entry's folder (None: complete): gone, no phi-onnx manifest, files missing."""
    if folder.is_symlink() or not folder.is_dir():
        return f"its folder models/{folder.name} is missing" if not os.path.lexists(folder) else \
            f"models/{folder.name} is not a folder"
    try:
        manifest = read_manifest(folder)
    except ManifestError:
        return f"its {MANIFEST} is unreadable"
    if manifest is None:
        return f"its {MANIFEST} is missing"
    if not is_export_manifest(manifest):
        return f"its {MANIFEST} was not written by phi-onnx"
    expected = manifest_files(manifest) | {"model.onnx", "genai_config.json"}
    if record is not None and isinstance(record.get("files"), list):
        expected |= {str(name) for name in record["files"]}
    missing = sorted(name for name in expected if not (folder / name).is_file())
    if missing:
        return "files are missing (" + ", ".join(missing) + ")"
    return None


def _entry_files(entry: StoreEntry, asked: str) -> set[str]:
    """The names in an entry's folder that `rm` may delete (the store wrote them).

    Raises:
        StoreError: the folder holds anything else; it is kept, and so is every other entry.
    """
    if not os.path.lexists(entry.folder):
        return set()
    listed = {MANIFEST}
    record = _read_record(store_root() / "entries" / f"{entry.id}.json")
    if record is not None and record.get("id") == entry.id and isinstance(record.get("files"), list):
        listed |= {str(name) for name in record["files"]}
    with contextlib.suppress(ManifestError):  # unreadable: its name is still listed above, the record says the rest
        listed |= manifest_files(read_manifest(entry.folder)) if entry.folder.is_dir() else set()
    foreign = ["models/" + entry.folder.name]
    if entry.folder.is_dir() and not entry.folder.is_symlink():
        names, foreign = written_files(entry.folder, listed)
        if not foreign:
            return names
    from phi_onnx.paths import printable

    shown = ", ".join(printable(name) for name in foreign[:5]) + (
        f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
    unknown = "" if len(listed) > 1 else f" (its {MANIFEST} is gone, and its record lists no files)"
    raise StoreError(f"The store entry {entry.id} holds {shown}, which phi-onnx did not write or cannot tell it "
                     f"wrote{unknown}; nothing was removed.",
                     hint=f"Move what you need out of {entry.folder} and delete the rest yourself, then run "
                          f"`phi-onnx rm {printable(asked)}` again.")


def _clear(folder: Path) -> None:
    """Delete a folder of the store's naming that holds a finished export (a stale `.pending-`), and only that.

    Raises:
        StoreError: it holds anything the export's manifest does not list; it is kept.
    """
    try:
        listed = manifest_files(read_manifest(folder)) if folder.is_dir() and not folder.is_symlink() else None
    except ManifestError:
        listed = None
    foreign = [folder.name]
    if listed is not None:
        names, foreign = written_files(folder, listed)
        if not foreign:
            foreign = delete_written(folder, names)
            if not foreign:
                return
    raise StoreError(f"{folder} is in the store's way and holds {', '.join(foreign[:5])}, which phi-onnx did not "
                     "write; it was left as it is.", hint="Move it out of the store folder, then run again.")


def _finish_removals() -> None:
    """Finish the removals an `rm` cut short left (`models/.removing-<id>`), deleting only the names they list."""
    models = store_root() / "models"
    for leftover in sorted(models.glob(f"{_REMOVING}*")) if models.is_dir() else []:
        entry_id = leftover.name[len(_REMOVING):]
        if not _ID.fullmatch(entry_id) or leftover.is_symlink() or not leftover.is_dir():
            continue  # not a name the store gives
        listed = {MANIFEST}
        removal = _read_record(leftover / _REMOVAL_LIST)
        if removal is not None and removal.get("id") == entry_id and isinstance(removal.get("files"), list):
            listed |= {str(name) for name in removal["files"]}
        with contextlib.suppress(ManifestError):
            listed |= manifest_files(read_manifest(leftover))  # cut short before its list was written
        names, _ = written_files(leftover, listed | {_REMOVAL_LIST})
        left = delete_written(leftover, names, last=(MANIFEST, _REMOVAL_LIST))
        if left:
            log.warning("Left %s: it holds %s, which phi-onnx did not write.", leftover, ", ".join(left))


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None  # missing or damaged: `list` shows the entry as damaged, and export rewrites it
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
