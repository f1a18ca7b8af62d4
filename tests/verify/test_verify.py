"""`phi-onnx verify`: passes on good exports, fails (exit 1, the figure named) on broken or mismatched ones,
records itself in the manifest, and says which extra to install when torch/transformers are missing."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from phi_onnx.cli import main
from phi_onnx.tiny import TINY_PHI3_DIR
from phi_onnx.verify import DEFAULT_THRESHOLDS, Thresholds, evaluate

FAST = ("--new-tokens", "8", "--text-tokens", "256", "--window", "128")


def run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def manifest(folder: Path) -> dict:
    return json.loads((folder / "phi_onnx.json").read_text())


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def copy_export(folder: Path, tmp_path: Path) -> Path:
    target = tmp_path / folder.name
    shutil.copytree(folder, target)
    return target


def corrupt(path: Path) -> None:
    """Flip the sign of (and scale) 1024 floats in the middle of the weights: the file stays valid."""
    data = bytearray(path.read_bytes())
    middle = (len(data) // 2) & ~3
    block = np.frombuffer(bytes(data[middle:middle + 4096]), dtype=np.float32) * -3.0
    data[middle:middle + 4096] = block.astype(np.float32).tobytes()
    path.write_bytes(bytes(data))


def test_good_fp32_export_passes_and_is_recorded(make_export, tmp_path):
    folder = copy_export(make_export("phi3-gqa"), tmp_path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def add(a, b):\n\nimport os\n")
    result = run("verify", str(folder), "--json", "--prompts", str(prompts), *FAST)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["passed"] and data["failed"] == [] and data["recorded"]
    figures = data["figures"]
    assert figures["max_abs_logit_diff"] < 1e-4 and figures["top1_agreement"] == 1.0
    assert figures["greedy_agreement"] == 1.0 and figures["perplexity_change"] < 1e-5
    assert data["inputs"]["prompts"] == 4 + 2  # built-in plus the two non-empty lines
    assert data["reference"]["same_as_source"] is True
    record = manifest(folder)["verification"]
    assert record["passed"] and record["figures"] == figures
    # The manifest's hash list still describes the folder (the manifest itself excluded).
    files = manifest(folder)["files"]
    assert files == {p.name: sha256(p) for p in folder.iterdir() if p.name != "phi_onnx.json"}
    assert "config.json" in files  # written for other runtimes (Optimum)


def test_int4_of_the_trained_tiny_model_passes_the_defaults(tmp_path):
    from phi_onnx.export import ExportOptions, export

    folder = tmp_path / "tiny-int4"
    export(TINY_PHI3_DIR, folder, ExportOptions(precision="int4"))
    result = run("verify", str(folder), "--json", "--new-tokens", "16")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["precision"] == "int4" and data["thresholds"] == DEFAULT_THRESHOLDS["int4"].to_dict()
    assert 0.85 < data["figures"]["top1_agreement"] < 1.0  # int4 is close, not exact
    assert data["figures"]["perplexity_change"] < 0.02
    # inspect shows the record, the fused ops and the provenance.
    info = json.loads(run("inspect", str(folder), "--json").stdout)
    assert info["precision"] == "int4" and info["fused_ops"]["MatMulNBits"] and info["fused_ops"]["GroupQueryAttention"]
    assert info["verification"]["passed"] and info["source"]["path"] == str(TINY_PHI3_DIR)
    names = [value["name"] for value in info["inputs"]]
    assert names[:2] == ["input_ids", "attention_mask"] and "past_key_values.3.value" in names
    assert info["outputs"][0]["shape"][-1] == 2048
    text = run("inspect", str(folder)).stdout
    assert "MatMulNBits yes" in text and "PASSED" in text


def test_corrupted_weights_fail_naming_the_figures(make_export, tmp_path):
    folder = copy_export(make_export("phi3-gqa"), tmp_path)
    corrupt(folder / "model.onnx.data")
    result = run("verify", str(folder), *FAST)
    assert result.exit_code == 1, result.output
    failed_line = result.stdout.strip().splitlines()[-1]
    assert failed_line.startswith("FAILED:") and "top1_agreement" in failed_line and "kl_divergence" in failed_line
    record = manifest(folder)["verification"]
    assert not record["passed"] and "max_abs_logit_diff" in record["failed"]
    assert record["files_changed_since_export"] == ["model.onnx.data"]
    assert manifest(folder)["files"]["model.onnx.data"] == sha256(folder / "model.onnx.data")
    assert manifest(folder)["files_at_export"]["model.onnx.data"] != sha256(folder / "model.onnx.data")
    # Verifying again still names the change made since the export.
    assert run("verify", str(folder), *FAST).exit_code == 1
    assert manifest(folder)["verification"]["files_changed_since_export"] == ["model.onnx.data"]


def test_wrong_reference_fails(make_export, make_checkpoint, tmp_path):
    folder = copy_export(make_export("phi3-mha"), tmp_path)
    # Same shapes, other weights (and a sliding window): comparable logits, different model.
    result = run("verify", str(folder), "--reference", str(make_checkpoint("phi3-window")), "--json", *FAST)
    assert result.exit_code == 1, result.output
    data = json.loads(result.stdout)
    assert data["reference"]["same_as_source"] is False
    assert {"top1_agreement", "kl_divergence", "max_abs_logit_diff"} <= set(data["failed"])


def test_incompatible_reference_is_a_clean_error(make_export):
    result = run("verify", str(make_export("phi3-mha")), "--reference", str(TINY_PHI3_DIR), "--no-record", *FAST)
    assert result.exit_code == 2
    assert "logits of shape" in result.stderr and "--reference" in result.stderr and "Traceback" not in result.output


def test_threshold_overrides_and_nan(make_export, tmp_path):
    folder = copy_export(make_export("phi3-mha"), tmp_path)
    # No two runtimes give bit-identical logits: a limit of 0 is valid and fails
    result = run("verify", str(folder), "--max-abs-logit-diff", "0", "--json", *FAST)
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    assert data["failed"] == ["max_abs_logit_diff"] and data["thresholds"]["max_abs_logit_diff"] == 0
    assert data["figures"]["max_abs_logit_diff"] > 0
    checks = evaluate({"top1_agreement": float("nan"), "kl_divergence": 0.0}, Thresholds(top1_agreement=0.5,
                                                                                       kl_divergence=1.0))
    assert [c.passed for c in checks] == [False, True]


def test_without_the_reference_extra(make_export, make_checkpoint, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    result = run("verify", str(make_export("phi3-mha")))
    assert result.exit_code == 2
    assert 'pip install "phi-onnx[reference]"' in result.stderr
    out = tmp_path / "never"
    result = run("export", str(make_checkpoint("phi3-mha")), "-o", str(out), "--precision", "fp32", "--verify")
    assert result.exit_code == 2 and 'phi-onnx[reference]' in result.stderr
    assert not out.exists()  # refused before exporting


def test_export_verify_flag(make_checkpoint, tmp_path, monkeypatch):
    out = tmp_path / "ok"
    result = run("export", str(make_checkpoint("phi3-mha")), "-o", str(out), "--precision", "fp32", "--verify",
                 "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["verification"]["passed"]
    assert manifest(out)["verification"]["passed"]
    # A verification that fails: exit 1, and the export stays with the failing record.
    monkeypatch.setitem(DEFAULT_THRESHOLDS, "fp32", Thresholds(max_abs_logit_diff=0.0))
    bad = tmp_path / "bad"
    result = run("export", str(make_checkpoint("phi3-mha")), "-o", str(bad), "--precision", "fp32", "--verify")
    assert result.exit_code == 1, result.output
    assert (bad / "model.onnx").is_file()
    assert manifest(bad)["verification"]["failed"] == ["max_abs_logit_diff"]


def test_settings_and_limits_that_cannot_work_are_refused_before_loading(tmp_path):
    from phi_onnx.verify import VerifyError, VerifySettings

    missing = tmp_path / "no-such-export"  # never reached: the settings are refused first
    result = run("verify", str(missing), "--text-tokens", "100", "--window", "256")
    assert result.exit_code == 2
    assert "text_tokens (100) is less than one perplexity window (256 tokens)" in result.stderr
    assert "--text-tokens" in result.stderr and "Traceback" not in result.output and not missing.exists()
    with pytest.raises(VerifyError, match="less than one perplexity window"):
        VerifySettings(text_tokens=10, window=11)
    assert VerifySettings(text_tokens=11, window=11).window == 11
    for bad in (float("nan"), float("inf"), -0.5, 1.5):
        with pytest.raises(VerifyError, match="top1_agreement limit must be a finite number from 0 to 1"):
            Thresholds(top1_agreement=bad)
        with pytest.raises(VerifyError, match="must be a finite number"):
            Thresholds().with_overrides(top1_agreement=bad)  # verify(threshold_overrides=...) takes this path
    assert Thresholds(top1_agreement=1, kl_divergence=0).top1_agreement == 1
