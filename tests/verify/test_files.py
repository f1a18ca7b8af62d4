"""Integrity: `verify --files`, `inspect --check`, `load(check_files=True)`; damaged manifests and models."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

import phi_onnx
from phi_onnx.cli import main
from phi_onnx.errors import CheckpointError
from phi_onnx.verify.files import IntegrityError, check_files, require_intact


def run(*args: str):
    return CliRunner().invoke(main, list(args))


@pytest.fixture
def folder(make_export, tmp_path):
    """A private copy of a tiny fp32 export, free to damage."""
    copy = tmp_path / "export"
    shutil.copytree(make_export("phi3-mha"), copy)
    return copy


def flip_a_byte(path, offset: int = 1000) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_intact_export_passes(folder):
    check = check_files(folder)
    assert check.ok and "model.onnx.data" in check.checked and "phi_onnx.json" not in check.checked
    result = run("verify", str(folder), "--files")
    assert result.exit_code == 0 and "Files OK" in result.output
    result = run("inspect", str(folder), "--check")
    assert result.exit_code == 0 and "files       OK" in result.output


def test_overwritten_weights_are_named(folder):
    flip_a_byte(folder / "model.onnx.data")
    (folder / "tokenizer_config.json").unlink()
    (folder / "notes.txt").write_text("mine")
    check = check_files(folder)
    assert (check.changed, check.missing, check.unlisted) == (["model.onnx.data"], ["tokenizer_config.json"],
                                                             ["notes.txt"])
    result = run("verify", str(folder), "--files")
    assert result.exit_code == 1, result.output
    assert "changed since the manifest was written: model.onnx.data" in result.output
    assert "missing: tokenizer_config.json" in result.output and "Traceback" not in result.output
    data = json.loads(run("verify", str(folder), "--files", "--json").output)
    assert data["ok"] is False and data["changed"] == ["model.onnx.data"]
    result = run("inspect", str(folder), "--check", "--json")
    assert result.exit_code == 1 and json.loads(result.output)["file_check"]["changed"] == ["model.onnx.data"]


def test_load_checks_files_only_when_asked(folder):
    flip_a_byte(folder / "model.onnx.data", offset=10)
    with pytest.raises(IntegrityError, match=r"changed since the manifest was written: model\.onnx\.data"):
        phi_onnx.load(folder, backend="ort", check_files=True)
    phi_onnx.load(folder, backend="ort").close()  # the default stays fast: nothing hashed


def test_intact_load_with_check(folder):
    model = phi_onnx.load(folder, backend="ort", check_files=True)
    assert model.generate([1, 2, 3], max_new_tokens=2).token_ids
    model.close()


@pytest.mark.parametrize("files", [None, [], {"model.onnx": "nothex"}, {"../../etc/passwd": "0" * 64}, {"a": 5}])
def test_damaged_file_lists_are_refused(folder, files):
    manifest = json.loads((folder / "phi_onnx.json").read_text())
    manifest["files"] = files
    (folder / "phi_onnx.json").write_text(json.dumps(manifest))
    with pytest.raises(IntegrityError, match="is not a list of file names and sha256"):
        require_intact(folder)
    result = run("verify", str(folder), "--files")
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_folder_without_manifest(folder):
    (folder / "phi_onnx.json").unlink()
    result = run("verify", str(folder), "--files")
    assert result.exit_code == 2 and "has no phi_onnx.json" in result.output


@pytest.mark.parametrize("key", ["options", "source", "tools", "verification"])
@pytest.mark.parametrize("value", [5, "int4", ["x"]])
def test_inspect_survives_damaged_manifest_sections(folder, key, value):
    manifest = json.loads((folder / "phi_onnx.json").read_text())
    manifest[key] = value
    (folder / "phi_onnx.json").write_text(json.dumps(manifest))
    result = run("inspect", str(folder))
    assert result.exit_code == 0, result.output
    assert "precision   fp32" in result.output
    assert json.loads(run("inspect", str(folder), "--json").output)[key] is None


def test_verification_record_with_wrong_types_is_shown(folder):
    manifest = json.loads((folder / "phi_onnx.json").read_text())
    manifest["verification"] = {"passed": False, "failed": [1], "figures": {"top1_agreement": "high"},
                                "reference": "x"}
    (folder / "phi_onnx.json").write_text(json.dumps(manifest))
    result = run("inspect", str(folder))
    assert result.exit_code == 0 and "FAILED (1)" in result.output


@pytest.mark.parametrize("content", [b"", b"\x00\x01garbage", b"\x08\x07"])
def test_empty_or_garbage_model_onnx(folder, content):
    (folder / "model.onnx").write_bytes(content)
    result = run("inspect", str(folder))
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "0 nodes" not in result.output
    assert ("is empty (0 bytes)" if not content else "is not a valid ONNX model") in result.output


def test_verify_refuses_a_pickle_only_reference_before_transformers(folder, tmp_path, make_checkpoint, monkeypatch):
    import transformers

    ckpt = tmp_path / "pickled"
    ckpt.mkdir()
    shutil.copy(make_checkpoint("phi3-mha") / "config.json", ckpt)
    (ckpt / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")

    def never(*args, **kwargs):
        raise AssertionError("transformers was asked to load a pickle checkpoint")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", never)
    result = run("verify", str(folder), "--reference", str(ckpt))
    assert result.exit_code == 2, result.output
    assert "holds only pickle checkpoints (pytorch_model.bin), which phi-onnx never loads" in result.output
    from phi_onnx.verify.runners import Reference

    with pytest.raises(CheckpointError, match="never loads"):
        Reference(ckpt)


@pytest.mark.parametrize("key", ["options", "source"])
def test_verify_survives_damaged_manifest_sections(folder, key):
    manifest = json.loads((folder / "phi_onnx.json").read_text())
    manifest[key] = 5
    (folder / "phi_onnx.json").write_text(json.dumps(manifest))
    result = run("verify", str(folder), "--no-record")
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "phi_onnx.json" in result.output
