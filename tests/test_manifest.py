"""phi_onnx.manifest: the one reader (absent → None, damaged → an error naming the file), the atomic writer,
the verification record and the tool versions."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from phi_onnx.errors import PhiOnnxError
from phi_onnx.manifest import (
    EXPORT_TOOLS,
    MANIFEST,
    ManifestError,
    read_manifest,
    record_verification,
    tool_versions,
    write_manifest,
)


def test_absent_manifest_reads_as_none(tmp_path: Path) -> None:
    assert read_manifest(tmp_path) is None


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", "\"a string\"", "\xff\xfe"])
def test_damaged_manifest_is_an_error_naming_the_file(tmp_path: Path, text: str) -> None:
    (tmp_path / MANIFEST).write_bytes(text.encode("latin-1"))
    with pytest.raises(ManifestError, match=MANIFEST) as caught:
        read_manifest(tmp_path)
    assert isinstance(caught.value, PhiOnnxError)
    assert caught.value.hint


def test_write_is_atomic_and_keeps_the_umask(tmp_path: Path) -> None:
    write_manifest(tmp_path, {"format": 1, "files": {}})
    write_manifest(tmp_path, {"format": 1, "files": {"a": "b"}})
    assert read_manifest(tmp_path) == {"format": 1, "files": {"a": "b"}}
    assert [p.name for p in tmp_path.iterdir()] == [MANIFEST]  # no temporary file left behind
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / MANIFEST).stat().st_mode) == 0o666 & ~umask


def test_failed_write_leaves_the_old_manifest(tmp_path: Path) -> None:
    write_manifest(tmp_path, {"format": 1})
    with pytest.raises(TypeError):
        write_manifest(tmp_path, {"format": object()})  # not JSON-serialisable: fails half way
    assert read_manifest(tmp_path) == {"format": 1}
    assert [p.name for p in tmp_path.iterdir()] == [MANIFEST]


def test_record_names_changed_files_and_keeps_the_export_hashes(tmp_path: Path) -> None:
    from phi_onnx.source.checkpoint import file_sha256

    (tmp_path / "model.onnx").write_bytes(b"graph")
    exported = {"model.onnx": file_sha256(tmp_path / "model.onnx")}
    write_manifest(tmp_path, {"files": exported, "verification": None})
    assert record_verification(tmp_path, {"passed": True, "files_changed_since_export": []}) == []
    (tmp_path / "model.onnx").write_bytes(b"edited")
    assert record_verification(tmp_path, {"passed": True, "files_changed_since_export": []}) == ["model.onnx"]
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert manifest["files_at_export"] == exported
    assert manifest["files"]["model.onnx"] == file_sha256(tmp_path / "model.onnx")
    assert manifest["verification"] == {"passed": True, "files_changed_since_export": ["model.onnx"]}


def test_record_without_manifest_writes_nothing(tmp_path: Path) -> None:
    assert record_verification(tmp_path, {"passed": True}) is None
    assert list(tmp_path.iterdir()) == []


def test_tool_versions_lists_installed_distributions_only() -> None:
    found = tool_versions([*EXPORT_TOOLS, "surely-not-an-installed-distribution"])
    assert found["python"].count(".") == 2
    assert "onnxruntime" in found and "surely-not-an-installed-distribution" not in found
