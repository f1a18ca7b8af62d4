"""The export manifest, `phi_onnx.json`: what a folder was built from, with what, and how it verified.

One module owns the file: its name, the one reader, the atomic writer, the verification record and
the tool versions both the export and the verification write into it.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import secrets
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from phi_onnx.errors import PhiOnnxError
from phi_onnx.jsonfile import read_json_object

log = logging.getLogger(__name__)

#: The manifest's file name inside an export folder.
MANIFEST = "phi_onnx.json"
REWRITE_HINT = "Export again with --overwrite to rewrite it."

#: Distributions whose versions an export records (the ones that shaped the graph and will run it).
EXPORT_TOOLS = ("phi-onnx", "onnx", "onnx-ir", "onnxruntime", "onnxruntime-gpu", "onnxruntime-genai",
                "onnxruntime-genai-cuda", "numpy")
#: Distributions whose versions a verification records (the two sides it compared).
VERIFY_TOOLS = ("phi-onnx", "onnxruntime", "onnxruntime-gpu", "torch", "transformers")


class ManifestError(PhiOnnxError):
    """phi_onnx.json exists but is not a readable JSON object."""


def manifest_path(folder: str | os.PathLike[str]) -> Path:
    """Where `folder`'s manifest lives."""
    return Path(folder) / MANIFEST


def read_manifest(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The folder's manifest, or None when it has none.

    Raises:
        ManifestError: the file exists but cannot be read, is not valid JSON, or is not a JSON object.
    """
    path = manifest_path(folder)
    if not path.is_file():
        return None
    return read_json_object(path, ManifestError, REWRITE_HINT)


def write_manifest(folder: str | os.PathLike[str], manifest: dict[str, Any]) -> None:
    """Replace the folder's manifest atomically (a crash leaves the old one, never half a file)."""
    folder = Path(folder)
    # A fresh name opened with "x" rather than mkstemp: mkstemp's files are 0600, and the manifest should get
    # the permissions (umask) every other file of the export gets.
    temp = folder / f".{MANIFEST}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        with open(temp, "x", encoding="utf-8") as out:
            out.write(json.dumps(manifest, indent=2) + "\n")
        os.replace(temp, folder / MANIFEST)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def record_verification(folder: str | os.PathLike[str], record: dict[str, Any]) -> list[str] | None:
    """Write `record` into the manifest's `verification`, and bring its file hashes up to date.

    The manifest lists the sha256 of every file; if one changed since the export (someone edited the
    weights), the record names it (`files_changed_since_export`) and the list is updated, so the hashes
    describe the files this verification measured rather than ones that are gone (the export's own list
    moves to `files_at_export`).

    Returns:
        The names of the files changed since the export, or None when the folder has no manifest
        (nothing is written then).
    """
    from phi_onnx.source.checkpoint import file_sha256

    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        return None
    recorded = manifest.get("files") or {}
    current = {p.name: file_sha256(p) for p in sorted(folder.iterdir())
               if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")}
    # The export's own hashes are kept aside the first time they stop matching, so a later verification
    # still names what changed since the export rather than since the previous verification.
    exported = manifest.get("files_at_export") or recorded
    changed = sorted(name for name in set(exported) | set(current) if exported.get(name) != current.get(name))
    if changed:
        log.warning("Files changed since the export: %s", ", ".join(changed))
        manifest.setdefault("files_at_export", recorded)
    manifest["files"] = current
    manifest["verification"] = {**record, "files_changed_since_export": changed}
    write_manifest(folder, manifest)
    return changed


def tool_versions(dists: Iterable[str]) -> dict[str, str]:
    """Python's version and each installed distribution's of `dists` (missing ones are left out)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for dist in dists:
        try:
            found[dist] = version(dist)
        except PackageNotFoundError:
            continue
    return found
