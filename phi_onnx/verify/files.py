"""Integrity of an export folder: each file against the sha256 its manifest records.

An export whose weights were overwritten still loads and generates garbage without a word; the manifest
lists every file's sha256 (brought up to date by `verify`), so checking them needs no reference model:
`phi-onnx verify --files`, `phi-onnx inspect --check`, `phi_onnx.load(folder, check_files=True)`.
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from phi_onnx.errors import PhiOnnxError
from phi_onnx.manifest import MANIFEST, read_manifest
from phi_onnx.paths import expand_user
from phi_onnx.source.checkpoint import file_sha256

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class IntegrityError(PhiOnnxError):
    """The export's files are not the ones its manifest records, or there is nothing to check them against."""


@dataclass
class FileCheck:
    """What `check_files` found: files whose bytes changed, files gone, files the manifest does not list."""

    folder: Path
    checked: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unlisted: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Every listed file is present with the recorded bytes (unlisted files do not count)."""
        return not self.changed and not self.missing

    def problems(self) -> str:
        """One sentence naming what changed and what is missing ("" when ok)."""
        parts = []
        if self.changed:
            parts.append(f"changed since the manifest was written: {', '.join(self.changed)}")
        if self.missing:
            parts.append(f"missing: {', '.join(self.missing)}")
        return "; ".join(parts)

    def summary(self) -> str:
        """Human-readable report."""
        if self.ok:
            line = f"Files OK: {len(self.checked)} files in {self.folder} match the sha256 in {MANIFEST}."
        else:
            line = f"Files FAILED in {self.folder}: {self.problems()}."
        if self.unlisted:
            line += f"\nNot listed in the manifest (not checked): {', '.join(self.unlisted)}."
        return line

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return {"folder": str(self.folder), "ok": self.ok, "checked": self.checked, "changed": self.changed,
                "missing": self.missing, "unlisted": self.unlisted}


def check_files(folder: str | os.PathLike[str]) -> FileCheck:
    """Hash every file the folder's manifest lists and compare with the recorded sha256.

    Raises:
        IntegrityError: the folder has no manifest, or its file list is not one phi-onnx writes.
        ManifestError: the manifest is not readable JSON.
    """
    path = expand_user(folder, what="The export folder", error=IntegrityError)
    if not path.is_dir():
        raise IntegrityError(f"{path} is not a folder.", hint="Pass a folder written by `phi-onnx export`.")
    manifest = read_manifest(path)
    if manifest is None:
        raise IntegrityError(f"{path} has no {MANIFEST}, so there are no recorded sha256 to check against.",
                             hint="Only phi-onnx exports record them; export again to get one.")
    recorded = manifest.get("files")
    if not isinstance(recorded, dict) or not recorded or not all(
            isinstance(name, str) and _plain(name) and isinstance(digest, str) and _SHA256.match(digest)
            for name, digest in recorded.items()):
        raise IntegrityError(f"{path / MANIFEST}: \"files\" is not a list of file names and sha256 digests.",
                             hint="The manifest is damaged; export again with --overwrite.")
    result = FileCheck(path.resolve(), checked=sorted(recorded))
    present = [name for name in result.checked if (path / name).is_file()]
    result.missing = [name for name in result.checked if name not in present]
    # hashlib releases the GIL: the files are read side by side (model.onnx.data dominates anyway)
    with ThreadPoolExecutor(max_workers=min(4, len(present) or 1)) as pool:
        digests = dict(zip(present, pool.map(lambda name: file_sha256(path / name), present), strict=True))
    result.changed = [name for name in present if digests[name] != recorded[name]]
    result.unlisted = sorted(p.name for p in path.iterdir()
                             if p.is_file() and p.name not in recorded and p.name != MANIFEST
                             and not p.name.startswith("."))
    return result


def require_intact(folder: str | os.PathLike[str]) -> FileCheck:
    """`check_files`, raising IntegrityError naming the files when any changed or is missing."""
    result = check_files(folder)
    if not result.ok:
        raise IntegrityError(f"{result.folder} is not the export its manifest describes: {result.problems()}.",
                             hint="Export again with --overwrite (or restore the files). If you changed them on "
                                  "purpose, `phi-onnx verify FOLDER` measures the folder as it is and records "
                                  "its new sha256.")
    return result


def _plain(name: str) -> bool:
    """A file name inside the folder, nothing that reaches outside it."""
    return name not in ("", ".", "..") and "/" not in name and "\\" not in name and "\0" not in name
