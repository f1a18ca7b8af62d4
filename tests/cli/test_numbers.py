"""Every numeric option refuses nan, ±inf and numbers outside its range before any work (exit 2, no traceback)."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from phi_onnx.cli import main
from phi_onnx.errors import OptionsError


def run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


CASES = [
    # (command line, the option, what the refusal says)
    (["bench", "M", "--bandwidth", "-1"], "--bandwidth", "-1.0 is not in the range x>0"),
    (["bench", "M", "--bandwidth", "0"], "--bandwidth", "0.0 is not in the range x>0"),
    (["bench", "M", "--bandwidth", "nan"], "--bandwidth", "'nan' is not a finite number"),
    (["bench", "M", "--bandwidth", "inf"], "--bandwidth", "'inf' is not a finite number"),
    (["verify", "F", "--min-top1", "nan"], "--min-top1", "'nan' is not a finite number"),
    (["verify", "F", "--min-top1", "1.5"], "--min-top1", "1.5 is not in the range 0<=x<=1"),
    (["verify", "F", "--min-greedy", "-0.1"], "--min-greedy", "-0.1 is not in the range 0<=x<=1"),
    (["verify", "F", "--max-kl", "inf"], "--max-kl", "'inf' is not a finite number"),
    (["verify", "F", "--max-kl", "-1"], "--max-kl", "-1.0 is not in the range x>=0"),
    (["verify", "F", "--max-abs-logit-diff", "-inf"], "--max-abs-logit-diff", "'-inf' is not a finite number"),
    (["verify", "F", "--max-ppl-change", "NaN"], "--max-ppl-change", "'NaN' is not a finite number"),
    (["serve", "M", "--replicas", "1", "--gpus-per-replica", "nan"], "--gpus-per-replica",
     "'nan' is not a finite number"),
    (["serve", "M", "--replicas", "1", "--gpus-per-replica", "inf"], "--gpus-per-replica",
     "'inf' is not a finite number"),
    (["serve", "M", "--replicas", "1", "--gpus-per-replica", "-1"], "--gpus-per-replica",
     "-1.0 is not in the range x>=0"),
]


@pytest.mark.parametrize(("args", "option", "why"), CASES, ids=[" ".join(c[0][2:]) + f" ({c[0][0]})" for c in CASES])
def test_non_finite_and_out_of_range_numbers_are_refused(args, option, why, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PHI_ONNX_HOME", str(tmp_path / "store"))
    result = run(*args)
    assert result.exit_code == 2, result.output
    assert f"Invalid value for '{option}'" in result.stderr and why in result.stderr
    assert "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []  # refused before the store, a model or a record is touched


def test_the_same_options_take_ordinary_numbers(tmp_path, monkeypatch):
    """The checks do not refuse what they should take: the command gets as far as the (missing) model."""
    monkeypatch.setenv("PHI_ONNX_HOME", str(tmp_path / "store"))
    for args in (["bench", str(tmp_path / "none"), "--bandwidth", "12.5"],
                 ["verify", str(tmp_path / "none"), "--min-top1", "0", "--max-kl", "0.1", "--min-greedy", "1"]):
        result = run(*args)
        assert result.exit_code == 2 and "Invalid value" not in result.stderr
        assert "none" in result.stderr and "Traceback" not in result.output


@pytest.mark.parametrize("bandwidth", [-1.0, 0.0, float("nan"), float("inf")])
def test_run_bench_refuses_a_bandwidth_that_is_not_a_positive_number(make_export, bandwidth):
    import phi_onnx
    from phi_onnx.runtime.bench import run_bench

    model = phi_onnx.load(make_export("phi3-mha", "int4"), device="cpu", backend="ort")
    with pytest.raises(OptionsError, match="positive number of GB/s"):
        run_bench(model, prompt_tokens=4, new_tokens=2, warmup=0, repeat=1, bandwidth_gbps=bandwidth)
    report = run_bench(model, prompt_tokens=4, new_tokens=2, warmup=0, repeat=1, bandwidth_gbps=10.0)
    assert report["memory_bandwidth_gbps"] == 10.0 and report["decode_ceiling_tokens_per_second"] > 0
