"""Bad input gets one clear paragraph, a non-zero exit, no traceback, and nothing written."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys

import onnx_ir as ir
import pytest
from click.testing import CliRunner

from phi_onnx.cli import main
from phi_onnx.errors import CheckpointError, OutputExistsError, SourceError, UnsupportedModelError
from phi_onnx.export import ExportOptions, export


def run_cli(*args: str):
    return CliRunner().invoke(main, list(args))


def assert_clean_failure(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.output


def test_unknown_short_name_lists_known_ones(tmp_path):
    result = run_cli("export", "phi-9", "-o", str(tmp_path / "out"))
    assert_clean_failure(result, "Unknown model 'phi-9'", "phi-3-mini", "phi-4-mini", "phi-3.5-moe")
    assert not (tmp_path / "out").exists()


def test_folder_without_config(tmp_path):
    (tmp_path / "ckpt").mkdir()
    result = run_cli("export", str(tmp_path / "ckpt"), "-o", str(tmp_path / "out"))
    assert_clean_failure(result, "has no config.json")
    assert list(tmp_path.iterdir()) == [tmp_path / "ckpt"]


def test_folder_without_weights(tmp_path, make_checkpoint):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    shutil.copy(make_checkpoint("phi3-mha") / "config.json", ckpt)
    with pytest.raises(CheckpointError, match=r"has no weights \(\*\.safetensors\)"):
        export(ckpt, tmp_path / "out")


def test_pickle_checkpoint_is_refused_not_loaded(tmp_path, make_checkpoint):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    shutil.copy(make_checkpoint("phi3-mha") / "config.json", ckpt)
    (ckpt / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(CheckpointError, match="never loads") as info:
        export(ckpt, tmp_path / "out")
    assert "safe_serialization=True" in str(info.value)


def test_unsupported_architecture(tmp_path, make_checkpoint):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(make_checkpoint("phi3-mha"), ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config["architectures"] = ["LlamaForCausalLM"]
    (ckpt / "config.json").write_text(json.dumps(config))
    result = run_cli("export", str(ckpt), "-o", str(tmp_path / "out"))
    assert_clean_failure(result, "'LlamaForCausalLM' is not supported", "Phi3ForCausalLM")


def test_planned_family_refused_before_download(tmp_path, monkeypatch):
    """A short name whose architecture has no builder is refused before any download is tried."""
    from phi_onnx.export import registry

    monkeypatch.delitem(registry.ARCHITECTURE_MODULES, "PhimoeForCausalLM")
    monkeypatch.setattr("phi_onnx.source.hub._from_hub", lambda *a, **k: pytest.fail("tried to download"))
    with pytest.raises(UnsupportedModelError, match=r"'PhimoeForCausalLM' is not supported"):
        export("phi-3.5-moe", tmp_path / "out")


def test_truncated_safetensors(tmp_path, make_checkpoint):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(make_checkpoint("phi3-mha"), ckpt)
    weights = ckpt / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 1000])
    result = run_cli("export", str(ckpt), "-o", str(tmp_path / "out"))
    assert_clean_failure(result, "is truncated", "download it again")
    assert not (tmp_path / "out").exists()


def test_weights_that_do_not_match_the_config(tmp_path, make_checkpoint):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(make_checkpoint("phi3-mha"), ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config["intermediate_size"] = 999
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"gate_up_proj\.weight' has shape"):
        export(ckpt, tmp_path / "out")


def test_a_tensor_no_builder_reads_is_refused_by_name(tmp_path, make_checkpoint):
    """An unknown variant's extra weights are an error naming them, not dropped silently (as llama.cpp refuses
    unmapped tensors); nothing is written."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    ckpt = tmp_path / "ckpt"
    shutil.copytree(make_checkpoint("phi3-mha"), ckpt)
    tensors = load_file(ckpt / "model.safetensors")
    tensors["model.layers.0.self_attn.extra_gate.weight"] = np.ones((4, 4), np.float32)
    save_file(tensors, ckpt / "model.safetensors")
    result = run_cli("export", str(ckpt), "-o", str(tmp_path / "out"), "--precision", "fp32")
    assert_clean_failure(result, "1 tensor that no part of the Phi3ForCausalLM graph reads",
                         "'model.layers.0.self_attn.extra_gate.weight'", "variant phi-onnx does not build")
    assert not (tmp_path / "out").exists()
    del tensors["model.layers.0.self_attn.extra_gate.weight"]  # the same checkpoint without it exports
    save_file(tensors, ckpt / "model.safetensors")
    export(ckpt, tmp_path / "out", ExportOptions(precision="fp32"))
    assert (tmp_path / "out" / "model.onnx").is_file()


def test_existing_output_is_refused_then_overwritten(tmp_path, make_checkpoint):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        export(make_checkpoint("phi3-mha"), out)
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    out.rmdir()
    export(make_checkpoint("phi3-mha"), out, ExportOptions(precision="fp32"))
    first = json.loads((out / "phi_onnx.json").read_text())
    export(make_checkpoint("phi3-mha"), out, ExportOptions(precision="fp32", max_length=64), overwrite=True)
    assert json.loads((out / "phi_onnx.json").read_text())["options"]["max_length"] == 64 != \
        first["options"]["max_length"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_interrupted_export_leaves_nothing(tmp_path, make_checkpoint, monkeypatch):
    """Ctrl-C while the weights are written: no output folder, no staging folder left behind."""
    real_save = ir.save

    def interrupted(model, path, **kwargs):
        real_save(model, path, **kwargs)  # the files exist in the staging folder by now
        raise KeyboardInterrupt

    monkeypatch.setattr(ir, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export(make_checkpoint("phi3-mha"), tmp_path / "out", ExportOptions(precision="fp32"))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("args", "message"), [
    (["--precision", "fp16"], "fp16 on CPU is refused"),
    (["--precision", "fp32", "--device", "cuda"], "fp32 on CUDA is refused"),
    (["--block-size", "48"], "Invalid int4 block size 48"),
])
def test_invalid_option_pairs(args, message, tmp_path, make_checkpoint):
    result = run_cli("export", str(make_checkpoint("phi3-mha")), "-o", str(tmp_path / "out"), *args)
    assert_clean_failure(result, message)
    assert not (tmp_path / "out").exists()


def test_hub_source_without_network_says_how_to_use_a_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(SourceError) as info:
        export("phi-3-mini", tmp_path / "out")
    assert "microsoft/Phi-3-mini-4k-instruct" in str(info.value)
    assert "pass the folder" in str(info.value)


def test_cli_runs_as_a_program_without_traceback(tmp_path):
    """The installed entry point (not only CliRunner) prints the error and exits 2."""
    proc = subprocess.run([sys.executable, "-m", "phi_onnx", "export", "nope", "-o", str(tmp_path / "o")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("Error: Unknown model 'nope'.")
    assert "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- the environment


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 2 MB tmpfs (root with mount rights only): a disk that really fills up."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode(errors='replace').strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_is_refused_before_writing(small_tmpfs, make_checkpoint):
    result = run_cli("export", str(make_checkpoint("phi3-mha")), "-o", str(small_tmpfs / "out"),
                     "--precision", "fp32")
    assert_clean_failure(result, "Not enough space", "it needs about", "free", "nothing was written")
    assert list(small_tmpfs.iterdir()) == []


def test_disk_filling_up_mid_export(small_tmpfs, make_checkpoint, monkeypatch):
    """The free-space check passes (another process freed space, then took it): the kernel's ENOSPC."""
    from phi_onnx.export import output

    monkeypatch.setattr(output, "check_free_space", lambda folder, needed: None)  # what staged_output calls
    result = run_cli("export", str(make_checkpoint("phi3-mha")), "-o", str(small_tmpfs / "out"),
                     "--precision", "fp32")
    assert_clean_failure(result, "The disk is full", str(small_tmpfs), "the export needs about", "MB",
                         "Nothing was left behind")
    assert list(small_tmpfs.iterdir()) == []


def test_enospc_from_a_patched_write(tmp_path, make_checkpoint, monkeypatch):
    real_save = ir.save

    def full(model, path, **kwargs):
        real_save(model, path, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ir, "save", full)
    result = run_cli("export", str(make_checkpoint("phi3-mha")), "-o", str(tmp_path / "out"), "--precision", "fp32")
    assert_clean_failure(result, "The disk is full", str(tmp_path), "the export needs about")
    assert list(tmp_path.iterdir()) == []


def test_read_only_file_system(small_tmpfs, make_checkpoint):
    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
    result = run_cli("export", str(make_checkpoint("phi3-mha")), "-o", str(small_tmpfs / "sub" / "out"))
    assert_clean_failure(result, f"Cannot write to {small_tmpfs}", "read-only")
    assert list(small_tmpfs.iterdir()) == []


def test_no_write_permission(tmp_path, make_checkpoint, monkeypatch):
    """Root ignores folder permissions, so the refusal the kernel gives others is injected."""
    from phi_onnx.export import output

    locked = tmp_path / "locked"
    locked.mkdir()

    def denied(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(output.Path, "mkdir", denied)
    result = run_cli("export", str(make_checkpoint("phi3-mha")), "-o", str(locked / "out"))
    assert_clean_failure(result, f"Cannot write to {locked}", "permission denied")
    assert list(locked.iterdir()) == []


def test_output_parent_is_a_file(tmp_path, make_checkpoint):
    (tmp_path / "file").write_text("mine")
    result = run_cli("export", str(make_checkpoint("phi3-mha")), "-o", str(tmp_path / "file" / "deeper" / "out"))
    assert_clean_failure(result, f"{tmp_path / 'file'} is a file, not a folder")
    assert (tmp_path / "file").read_text() == "mine"


def test_output_path_with_a_nul_character(tmp_path, make_checkpoint):
    from phi_onnx.errors import OutputWriteError

    with pytest.raises(OutputWriteError, match="contains a NUL character"):
        export(make_checkpoint("phi3-mha"), str(tmp_path / "o\0ut"))
    assert list(tmp_path.iterdir()) == []
