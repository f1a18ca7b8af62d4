"""`phi-onnx verify --against FOLDER`: a quantized export's quality report against another export (its fp32
export), without torch: KL, top-1 and perplexity change, printed and in --json, with limits a CI can gate on."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import kl_and_top1, window_log_probs

from phi_onnx.cli import main
from phi_onnx.export import ExportOptions, export
from phi_onnx.tiny import TINY_PHI3_DIR
from phi_onnx.verify import VerifySettings, verify

HELDOUT = TINY_PHI3_DIR / "heldout.txt"
FAST = ("--new-tokens", "4", "--text", str(HELDOUT), "--text-tokens", "512", "--window", "128")


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> tuple[Path, Path, Path]:
    """tiny-phi3's fp32 export, its default int4 export, and an int4 export of another checkpoint's weights."""
    root = tmp_path_factory.mktemp("quality")
    export(TINY_PHI3_DIR, root / "fp32", ExportOptions(precision="fp32"))
    export(TINY_PHI3_DIR, root / "int4", ExportOptions())
    return root / "fp32", root / "int4", root


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def test_report_against_the_fp32_export(exports):
    fp32, int4, _ = exports
    result = run("verify", str(int4), "--against", str(fp32), "--json", "--no-record", *FAST)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["passed"] and data["recorded"] is False
    assert data["reference"]["kind"] == "export" and data["reference"]["precision"] == "fp32"
    assert data["reference"]["same_as_source"] is True
    figures = data["figures"]
    assert 0 < figures["kl_divergence"] < 0.05 and 0.85 < figures["top1_agreement"] < 1.0
    assert figures["perplexity_reference"] > 1 and figures["perplexity_change"] < 0.05
    assert figures["kl_divergence_se"] > 0
    printed = run("verify", str(int4), "--against", str(fp32), "--no-record", *FAST)
    assert printed.exit_code == 0 and "against the fp32 export" in printed.output and "PASSED" in printed.output
    assert "kl_divergence" in printed.output and "top1_agreement" in printed.output


def test_kl_agrees_with_a_direct_computation(exports):
    """The report's KL and top-1 are those of the same positions computed here: the one prompt (no decode
    step) and the text's 4 windows of 128, each from an empty cache."""
    from phi_onnx.runtime.tokenizer import TextTokenizer

    fp32, int4, _ = exports
    text = HELDOUT.read_text()
    prompt = "Return the number of items."
    settings = VerifySettings(prompts=(prompt,), use_builtin_prompts=False, new_tokens=1, text=text,
                              text_source=str(HELDOUT), text_tokens=512, window=128)
    result = verify(int4, against=fp32, settings=settings, record=False)
    tokenizer = TextTokenizer(int4)
    prompt_ids = np.asarray([tokenizer.encode(prompt)], dtype=np.int64)
    rows = np.asarray(tokenizer.encode(text, add_special_tokens=False)[:512], dtype=np.int64).reshape(4, 128)
    kl, top1 = [], []
    for ids in (prompt_ids, rows):
        k, t = kl_and_top1(window_log_probs(fp32, ids), window_log_probs(int4, ids))
        kl.append(k * ids.shape[1])  # per-window sums
        top1.append(t * ids.shape[1])
    positions = prompt_ids.size + rows.size
    assert result.inputs["positions"] == positions
    assert result.figures["kl_divergence"] == pytest.approx(sum(k.sum() for k in kl) / positions, rel=1e-4)
    assert result.figures["top1_agreement"] == pytest.approx(sum(t.sum() for t in top1) / positions, abs=1e-9)


def test_gates_fail_with_the_figure_named(exports):
    fp32, int4, _ = exports
    result = run("verify", str(int4), "--against", str(fp32), "--max-kl", "1e-9", "--min-top1", "0.9999",
                 "--json", "--no-record", *FAST)
    assert result.exit_code == 1, result.output
    data = json.loads(result.stdout)
    assert not data["passed"] and set(data["failed"]) == {"kl_divergence", "top1_agreement"}


def test_recorded_in_the_manifest(exports, tmp_path):
    import shutil

    fp32, int4, _ = exports
    folder = tmp_path / "int4"
    shutil.copytree(int4, folder)
    assert run("verify", str(folder), "--against", str(fp32), *FAST).exit_code == 0
    record = json.loads((folder / "phi_onnx.json").read_text())["verification"]
    assert record["passed"] and record["reference"]["kind"] == "export"
    assert record["reference"]["path"] == str(fp32.resolve())


def test_bad_against_is_a_clear_error(exports, tmp_path):
    fp32, int4, _ = exports
    both = run("verify", str(int4), "--against", str(fp32), "--reference", str(TINY_PHI3_DIR), "--no-record")
    assert both.exit_code == 2 and "one of --reference and --against" in both.output
    assert "Traceback" not in both.output
    itself = run("verify", str(int4), "--against", str(int4), "--no-record")
    assert itself.exit_code == 2 and "its own reference" in itself.output
    empty = tmp_path / "empty"
    empty.mkdir()
    missing = run("verify", str(int4), "--against", str(empty), "--no-record")
    assert missing.exit_code == 2 and str(empty) in missing.output and "Traceback" not in missing.output
