"""The output folder: what `--overwrite` may replace, the staging folder, and the one move into place.

An export is written into a hidden staging folder beside its target (`.NAME.XXXXXXXX.partial`, created
with the umask's permissions) and moved into place by a rename once complete. What may be replaced:

- nothing, without `overwrite`: a target that exists, or appears while the export runs, is an error;
- with `overwrite`, only a previous phi-onnx export: a folder whose phi_onnx.json says phi-onnx wrote it
  and that holds nothing but the files that manifest lists. Never the source checkpoint, a folder that
  holds it, or the working directory (real paths compared, symlinks resolved).

The target is checked when the export starts and again at the move, under a lock beside it, and must be
the very folder that was checked (same inode, same manifest, same names): a folder that appeared or
changed meanwhile (another export to the same place) is left alone and this export fails. An old export
is moved aside, the new one renamed in, and only then are the old one's files deleted, by name.

Each staging folder holds a marker naming its process (pid, start time, host); a later export to the
same target removes the staging folders of processes that are gone (killed mid-export). `staged_output`
is the one way a command writes a new folder (export, quantize): stage, then move into place, or clean up.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import secrets
import shutil
import socket
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

from phi_onnx.errors import OutputExistsError, OutputWriteError, PhiOnnxError
from phi_onnx.manifest import MANIFEST, read_manifest

log = logging.getLogger(__name__)

#: Inside a staging folder: which process writes it, so a later run can tell a dead one's leftovers.
MARKER = ".phi-onnx-partial"
OVERWRITE_HINT = "Choose another output folder, or remove this one yourself if it holds nothing you need."

#: What was checked about an existing target: (device, inode, manifest's inode/mtime/size, entry names).
Fingerprint = tuple[Any, ...]


def is_export_manifest(manifest: Any) -> bool:
    """Whether a parsed phi_onnx.json is one phi-onnx wrote (format, file list and its own version)."""
    return (isinstance(manifest, dict) and manifest.get("format") == 1 and isinstance(manifest.get("files"), dict)
            and isinstance(manifest.get("tools"), dict) and "phi-onnx" in manifest["tools"])


def check_target(target: Path, *, overwrite: bool, protected: Sequence[tuple[Path, str]] = ()
                 ) -> Fingerprint | None:
    """Refuse a target that may not be written; return what was checked (None: it does not exist).

    Args:
        target: the output folder (absolute).
        overwrite: whether an existing previous export may be replaced.
        protected: (path, what) pairs never to replace, nor any folder holding them (the source, the
            working directory).

    Raises:
        OutputExistsError: the target exists and may not be replaced, with the reason.
    """
    if not os.path.lexists(target):
        return None
    if not overwrite:
        raise OutputExistsError(f"Output folder {target} already exists.",
                                hint="Pass --overwrite (overwrite=True) to replace a previous phi-onnx export, "
                                     "or choose another folder.")
    _replaceable_files(target, protected)
    return _fingerprint(target)


def _replaceable_files(target: Path, protected: Sequence[tuple[Path, str]]) -> set[str]:
    """The names of the files an overwrite of `target` would delete; refuses anything else."""
    real = target.resolve()
    for path, what in protected:
        held = path.resolve()
        if real == held or real in held.parents:
            relation = "is" if real == held else "holds"
            raise OutputExistsError(f"Refusing to overwrite {target}: it {relation} {what} ({held}).",
                                    hint="Choose an output folder outside it.")
    if target.is_symlink() or not target.is_dir():
        raise OutputExistsError(f"Refusing to overwrite {target}: it is not a folder.", hint=OVERWRITE_HINT)
    try:
        manifest = read_manifest(target)
    except PhiOnnxError as error:
        raise OutputExistsError(f"Refusing to overwrite {target}: its {MANIFEST} is unreadable ({error.message}).",
                                hint=OVERWRITE_HINT) from error
    if not is_export_manifest(manifest):
        raise OutputExistsError(f"Refusing to overwrite {target}: it is not a phi-onnx export (no {MANIFEST} "
                                "written by phi-onnx).", hint=OVERWRITE_HINT)
    files, foreign = written_files(target, manifest_files(manifest))
    if foreign:
        shown = ", ".join(sorted(foreign)[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise OutputExistsError(f"Refusing to overwrite {target}: besides a phi-onnx export it holds {shown}, "
                                "which phi-onnx did not write.",
                                hint="Move those out of the folder, or choose another output folder.")
    return files


def manifest_files(manifest: Any) -> set[str]:
    """The file names a phi-onnx manifest lists (its `files` and, after a re-verification, `files_at_export`)."""
    if not isinstance(manifest, dict):
        return set()
    return {str(name) for key in ("files", "files_at_export") if isinstance(manifest.get(key), dict)
            for name in manifest[key]}


def written_files(folder: Path, listed: Iterable[str]) -> tuple[set[str], list[str]]:
    """Split `folder`'s entries into the files phi-onnx wrote and the rest.

    Ours: regular files (not links, not folders) named in `listed`, the manifest, the staging marker, and
    the temporary files verify's atomic manifest writer leaves (`.phi_onnx.json.XXXX`) if it is killed
    mid-write. The rest are returned by name, folders with a trailing `/`. A name in `listed` that is not a
    plain file name (a `/`, `..`) never matches, so a damaged manifest cannot point outside `folder`.
    """
    allowed = {name for name in listed if _plain_name(name)} | {MANIFEST, MARKER}
    ours: set[str] = set()
    foreign: list[str] = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if (entry.name in allowed or entry.name.startswith(f".{MANIFEST}.")) and entry.is_file(
                    follow_symlinks=False):
                ours.add(entry.name)
            else:
                foreign.append(entry.name + ("/" if entry.is_dir(follow_symlinks=False) else ""))
    return ours, sorted(foreign)


def delete_written(folder: Path, names: Iterable[str], *, last: Sequence[str] = (MANIFEST,)) -> list[str]:
    """Delete the files `names` (plain names in `folder`), then `folder` if that emptied it.

    Only regular files and links are deleted, never a folder or what a link points to. The names in
    `last` go last, in that order: while the manifest is there, what is left can still be told apart.
    Returns what is left in `folder` (empty when it is gone).
    """
    wanted = {name for name in names if _plain_name(name)}
    ordered = sorted(wanted - set(last)) + [name for name in last if name in wanted]
    for name in ordered:
        path = folder / name
        with contextlib.suppress(FileNotFoundError):
            if path.is_symlink() or path.is_file():
                path.unlink()
    try:
        folder.rmdir()
    except FileNotFoundError:
        return []
    except OSError:
        try:
            return sorted(os.listdir(folder))
        except OSError:
            return ["?"]
    return []


def _plain_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and "\0" not in name and "/" not in name and (
        os.altsep is None or os.altsep not in name)


def _fingerprint(target: Path) -> Fingerprint | None:
    try:
        folder = os.stat(target, follow_symlinks=False)
        names = tuple(sorted(os.listdir(target))) if target.is_dir() else ()
    except FileNotFoundError:
        return None
    try:
        manifest = os.stat(target / MANIFEST)
        stamp: tuple[int, ...] = (manifest.st_ino, manifest.st_mtime_ns, manifest.st_size)
    except OSError:
        stamp = ()
    return (folder.st_dev, folder.st_ino, stamp, names)


# --------------------------------------------------------------------------- staging


def make_staging(target: Path) -> Path:
    """Create the hidden staging folder beside `target` (umask permissions), after removing dead ones."""
    remove_stale_staging(target)
    while True:
        staging = target.with_name(f"{_hidden(target)}{secrets.token_hex(4)}.partial")
        try:
            staging.mkdir()  # mode 0o777 less the umask, where mkdtemp would force 0700
        except FileExistsError:
            continue
        break
    try:
        (staging / MARKER).write_text(json.dumps(_this_process()) + "\n", encoding="utf-8")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging


def _hidden(target: Path) -> str:
    """The start of the hidden names beside `target`: `.NAME.`, cut so that a suffix fits the 255-byte name limit."""
    return f".{target.name.encode()[:200].decode(errors='ignore')}."


def remove_stale_staging(target: Path) -> list[Path]:
    """Remove the staging folders (and old exports moved aside) that dead processes left for `target`."""
    removed = []
    with contextlib.suppress(OSError), os.scandir(target.parent) as entries:
        for entry in entries:
            name = entry.name
            if not (name.startswith(_hidden(target)) and name.endswith(".partial")
                    and entry.is_dir(follow_symlinks=False)):
                continue
            owner = _read_marker(Path(entry.path))
            if owner is None or _alive(owner):
                continue  # not ours (no marker), or its export is still running
            log.info("removing %s, left by an export that did not finish (pid %s)", entry.path, owner.get("pid"))
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(Path(entry.path))
    return removed


def _this_process() -> dict[str, Any]:
    return {"pid": os.getpid(), "start": _start_time(os.getpid()), "host": socket.gethostname()}


def _read_marker(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("pid"), int) else None


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), which tells a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()  # the command name in parentheses may hold spaces
    return fields[19] if len(fields) > 19 else None


def _alive(owner: dict[str, Any]) -> bool:
    if owner.get("host") != socket.gethostname():
        return True  # a folder shared over the network: another machine's process cannot be checked
    pid = int(owner["pid"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    recorded, now = owner.get("start"), _start_time(pid)
    return recorded is None or now is None or recorded == now


# --------------------------------------------------------------------------- the move


def move_into_place(staging: Path, target: Path, checked: Fingerprint | None,
                    protected: Sequence[tuple[Path, str]] = ()) -> None:
    """Rename the finished staging folder to `target`, replacing only the export that was checked.

    Raises:
        OutputExistsError: the target appeared or changed since it was checked; it is left as it is.
    """
    (staging / MARKER).unlink(missing_ok=True)
    aside = None
    with _lock(target):
        if _fingerprint(target) != checked:
            what = "appeared" if checked is None else "changed"
            raise OutputExistsError(f"Output folder {target} {what} while this export ran (another export to the "
                                    "same folder?); it was left as it is and this export was discarded.",
                                    hint="Export again to another folder, or with --overwrite once the other "
                                         "one finished.")
        if checked is None:
            try:
                os.rename(staging, target)  # onto a missing name: atomic
            except OSError as error:
                if error.errno in (errno.EEXIST, errno.ENOTEMPTY):
                    raise OutputExistsError(f"Output folder {target} appeared while this export ran; it was "
                                            "left as it is.", hint="Export again to another folder.") from error
                raise
            return
        files = _replaceable_files(target, protected)
        aside = target.with_name(f"{_hidden(target)}{secrets.token_hex(4)}.partial")
        os.rename(target, aside)
        try:
            os.rename(staging, target)
        except BaseException:
            os.rename(aside, target)
            raise
    # The old export is deleted only now that the new one is in place, file by file: anything that was
    # not checked (a file dropped in at the last moment) stays.
    with contextlib.suppress(OSError):
        (aside / MARKER).write_text(json.dumps(_this_process()) + "\n", encoding="utf-8")
    for name in files | {MARKER}:
        with contextlib.suppress(FileNotFoundError):
            (aside / name).unlink()
    try:
        aside.rmdir()
    except OSError:
        log.warning("left %s: it holds files that phi-onnx did not write", aside)


@contextlib.contextmanager
def staged_output(target: Path, *, checked: Fingerprint | None = None, protected: Sequence[tuple[Path, str]] = (),
                  needed: int | None = None) -> Iterator[Path]:
    """Write a new output folder in a staging folder and move it into place when the block completes.

    Yields the staging folder (beside `target`, after `check_parent` and, when `needed` bytes are
    given, `check_free_space`). When the block ends normally the folder is moved to `target`, replacing
    only the export `checked` saw (`move_into_place`); when anything is raised, Ctrl-C included, the
    staging folder is removed and the error goes on, a failed write as one sentence (`write_error`).

    Raises:
        OutputExistsError: the target appeared or changed meanwhile.
        OutputWriteError: the disk is full, read-only or not writable, or a parent is a file.
    """
    check_parent(target)
    if needed is not None:
        check_free_space(target.parent, needed)
    try:
        staging = make_staging(target)
    except OSError as error:
        _raise_write_error(error, target.parent)
    try:
        yield staging
        move_into_place(staging, target, checked, protected)
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)  # this process made it, beside the target, under a hidden name
        _raise_write_error(error, target.parent, needed)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _raise_write_error(error: OSError, folder: Path, needed: int | None = None) -> NoReturn:
    """Re-raise a failed write as one sentence when the disk caused it (full, read-only, no permission)."""
    converted = write_error(error, folder, needed)
    if converted is error:
        raise error
    raise converted from error


@contextlib.contextmanager
def _lock(target: Path) -> Iterator[None]:
    """An exclusive lock on `.NAME.phi-onnx.lock` beside `target` (no-op where fcntl does not exist)."""
    try:
        import fcntl
    except ImportError:  # Windows: the rename checks alone
        yield
        return
    # A name of our own: the lock file is deleted afterwards, and `.NAME.lock` may be another tool's
    path = target.with_name(f"{_hidden(target)}phi-onnx.lock")
    while True:
        handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            if os.fstat(handle).st_ino == os.stat(path).st_ino:
                break  # still the file at that path: the previous holder did not remove it meanwhile
        except FileNotFoundError:
            pass
        os.close(handle)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # while still holding it, so a waiter sees a new file and retries
        os.close(handle)


# --------------------------------------------------------------------------- environment errors


def check_parent(target: Path) -> None:
    """Create the target's parent folders, or say in one sentence why they cannot be."""
    for folder in (target.parent, *target.parent.parents):
        if os.path.lexists(folder):
            if not folder.is_dir():
                raise OutputWriteError(f"Cannot create {target}: {folder} is a file, not a folder.",
                                       hint="Choose an output path whose parent folders are folders.")
            break
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        converted = write_error(error, target.parent)
        if converted is error:
            raise
        raise converted from error


def check_free_space(folder: Path, needed: int) -> None:
    """Refuse before writing when the disk holding `folder` has less than `needed` bytes free."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if free < needed:
        raise OutputWriteError(f"Not enough space for the export in {folder}: it needs about {_size(needed)} and "
                               f"the disk has {_size(free)} free; nothing was written.",
                               hint="Free some space, or export to another disk with -o.")


def write_error(error: OSError, folder: Path, needed: int | None = None) -> PhiOnnxError | OSError:
    """A user-facing error for a write into `folder` that failed because of the disk, else `error` itself."""
    if isinstance(error.filename, str) and not str(Path(error.filename).absolute()).startswith(str(folder)):
        return error  # another file (the source being read, say): not this folder's problem
    where = f"{folder}" + (f" ({error.filename})" if error.filename and str(error.filename) != str(folder) else "")
    # numpy's tofile reports a short write as "N requested and M written", with no errno
    short_write = error.errno is None and "requested and" in str(error)
    if error.errno in (errno.ENOSPC, errno.EDQUOT) or short_write:
        try:
            free = f", {_size(shutil.disk_usage(folder if folder.exists() else folder.parent).free)} free now"
        except OSError:
            free = ""
        needs = f"; the export needs about {_size(needed)}" if needed else ""
        return OutputWriteError(f"The disk is full: writing to {where} failed{needs}{free}. Nothing was left "
                                "behind.", hint="Free some space, or export to another disk with -o.")
    if error.errno == errno.EROFS:
        return OutputWriteError(f"Cannot write to {where}: the file system is read-only.",
                                hint="Choose an output folder on a writable disk with -o.")
    if error.errno in (errno.EACCES, errno.EPERM):
        return OutputWriteError(f"Cannot write to {where}: permission denied.",
                                hint="Choose an output folder you can write to with -o, or fix its permissions.")
    if error.errno is not None and error.filename:  # e.g. ENOENT making a folder in /proc, EIO, a long name
        return OutputWriteError(f"Cannot write to {where}: {error.strerror or os.strerror(error.errno)}.",
                                hint="Choose an output folder on an ordinary writable disk.")
    return error


def _size(num: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if num < 1000 or unit == "GB":
            return f"{num:.0f} {unit}" if unit == "B" else f"{num:.1f} {unit}"
        num /= 1000  # type: ignore[assignment]
    return f"{num:.1f} TB"
