"""Mixed precision (`mix="auto"`): the most sensitive projections at 8 bits (MatMulNBits bits=8) within a budget."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from helpers import heldout_windows_of, kl_and_top1, window_log_probs

from phi_onnx.errors import OptionsError
from phi_onnx.export import ExportOptions, export
from phi_onnx.export.graph import GraphBuilder
from phi_onnx.export.weights import Weights
from phi_onnx.quantize.embedding import dequantize_table, quantize_table
from phi_onnx.quantize.mix import Sensitivity, bits_bytes, choose_eight_bit
from phi_onnx.tiny import TINY_PHI3_DIR


def one_linear(folder: Path, weight: np.ndarray, options: ExportOptions, eight_bit: bool) -> ort.InferenceSession:
    """A graph of one projection built by the export's own `Weights`, run on ONNX Runtime's CPU provider."""
    folder.mkdir(exist_ok=True)
    g, w = GraphBuilder(), Weights(options)
    if eight_bit:
        w.eight_bit = frozenset({"proj"})
    x = g.input("x", ir.DataType.FLOAT, [1, 3, weight.shape[1]])
    y = w.linear(g, x, "proj", weight.shape[0], weight.shape[1], lambda: weight)
    g.output(y, "y", ir.DataType.FLOAT, [1, 3, weight.shape[0]])
    w.flush(g)
    ir.save(g.model(producer_version="test"), folder / "m.onnx", external_data="m.onnx.data")
    return ort.InferenceSession(str(folder / "m.onnx"), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("symmetric", [True, False])
# Tolerance as a share of the largest output: int8 compute (level 4) quantizes the activations too
# (measured: 0.23 off in outputs up to 37, 0.6 %).
@pytest.mark.parametrize(("accuracy_level", "tolerance"), [(1, 1e-5), (4, 0.02)])
def test_ort_runs_the_8_bit_projections_on_cpu(tmp_path, symmetric, accuracy_level, tolerance):
    """The 8-bit MatMulNBits a mixed export writes (1-D scales and zero points, K not a multiple of the block)
    runs on ONNX Runtime's CPU provider and multiplies by the 8-bit table, at fp32 and at int8 compute."""
    rng = np.random.default_rng(7)
    weight = rng.standard_normal((48, 200)).astype(np.float32)
    options = ExportOptions(block_size=32, symmetric=symmetric, accuracy_level=accuracy_level)
    session = one_linear(tmp_path / "int8", weight, options, eight_bit=True)
    graph = onnx.load(tmp_path / "int8" / "m.onnx", load_external_data=False).graph
    assert [(n.op_type, next(a.i for a in n.attribute if a.name == "bits")) for n in graph.node] == [("MatMulNBits", 8)]
    x = rng.standard_normal((1, 3, 200)).astype(np.float32)
    got = session.run(None, {"x": x})[0]
    expected = x @ dequantize_table(quantize_table(weight, 8, 32, symmetric)).T
    np.testing.assert_allclose(got, expected, atol=tolerance * np.abs(expected).max())
    # and it is far closer to the float weight than the int4 projection
    int4 = one_linear(tmp_path / "int4", weight, options, eight_bit=False).run(None, {"x": x})[0]
    exact = x @ weight.T
    assert np.abs(got - exact).max() < np.abs(int4 - exact).max() / 4


def test_knapsack_takes_the_most_gain_per_byte_that_fits():
    s = {"a": Sensitivity(4.0, 0.0, 100), "b": Sensitivity(3.0, 0.0, 10), "c": Sensitivity(1.0, 0.0, 50),
         "d": Sensitivity(0.0, 0.0, 1), "e": Sensitivity(2.0, 0.5, 20)}
    # gain per byte: b 0.3, e 0.05, a 0.04, c 0.02, d 0 (never worth a byte)
    assert choose_eight_bit(s, 35) == ["b", "e"]
    assert choose_eight_bit(s, 90) == ["b", "e", "c"]  # a does not fit after b and e; c still does
    assert choose_eight_bit(s, 1000) == ["b", "e", "a", "c"]
    assert choose_eight_bit(s, 5) == []


def test_extra_bytes_of_8_bits():
    assert bits_bytes(64, 256, 8, 32, True) - bits_bytes(64, 256, 4, 32, True) == 64 * 256 // 2
    # asymmetric: the zero points go from two per byte to one per byte as well
    assert bits_bytes(64, 256, 8, 32, False) - bits_bytes(64, 256, 4, 32, False) == 64 * 256 // 2 + 64 * 8 // 2


def test_options_are_validated_and_recorded():
    with pytest.raises(OptionsError, match="int4 exports"):
        ExportOptions(precision="fp32", mix="auto")
    with pytest.raises(OptionsError, match="--mix is none"):
        ExportOptions(mix_budget=0.1)
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(OptionsError, match="mix budget"):
            ExportOptions(mix="auto", mix_budget=bad)
    with pytest.raises(OptionsError, match="mix setting"):
        ExportOptions(mix="all")  # type: ignore[arg-type]
    with pytest.raises(OptionsError, match="must be a number"):
        ExportOptions(mix="auto", mix_budget="0.1")  # type: ignore[arg-type]
    assert "mix" not in ExportOptions().to_dict()  # records without a mix are as before
    mixed = ExportOptions(algo="rtn", mix="auto", mix_budget=1)
    assert mixed.calibrates and not mixed.weights_calibration
    assert (mixed.to_dict()["mix"], mixed.to_dict()["mix_budget"], mixed.to_dict()["calibration_tokens"]) == \
        ("auto", 1, 1024)
    assert ExportOptions(algo="gptq", mix="auto").to_dict()["calibration_tokens"] == 4096
    ExportOptions(algo="rtn", mix="auto", calibration="x.txt")  # rtn may take a text when the mix uses it
    assert ExportOptions(mix="auto").variant() == "cpu-int4-rtn-block-32-mix"


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> tuple[Path, Path, dict]:
    """tiny-phi3 exported with the defaults, and with `mix="auto"` (its default +10 % budget)."""
    root = tmp_path_factory.mktemp("mix")
    export(TINY_PHI3_DIR, root / "plain", ExportOptions())
    export(TINY_PHI3_DIR, root / "mixed", ExportOptions(mix="auto"))
    record = json.loads((root / "mixed" / "phi_onnx.json").read_text())["quantization"]
    return root / "plain", root / "mixed", record


def test_mixed_export_keeps_the_chosen_projections_at_8_bits_within_the_budget(mixed):
    plain, folder, record = mixed
    mix = record["mix"]
    graph = onnx.load(folder / "model.onnx", load_external_data=False).graph
    bits = {n.name.rsplit("/", 1)[0].removeprefix("/").replace("/", "."): next(
        a.i for a in n.attribute if a.name == "bits") for n in graph.node if n.op_type == "MatMulNBits"}
    eight = {name for name, b in bits.items() if b == 8 and name != "lm_head"}
    assert eight == set(mix["eight_bit"]) and eight  # the graph holds what the manifest says
    assert set(mix["tensors"]) == {name for name in bits if name != "lm_head"}  # every projection measured
    assert all(mix["tensors"][k]["bits"] == (8 if k in eight else 4) for k in mix["tensors"])
    # within the budget, and the file grew by exactly the bytes recorded (scales are the same at 4 and 8 bits)
    assert 0 < mix["added_bytes"] <= mix["budget"] * mix["base_bytes"]
    grown = (folder / "model.onnx.data").stat().st_size - (plain / "model.onnx.data").stat().st_size
    assert grown == mix["added_bytes"]
    # 8 bits leave about 1/256 of the int4 error (a grid 16 times finer)
    shares = [t["int8_share"] for t in mix["tensors"].values()]
    assert min(shares) > 1 / 400 and max(shares) < 1 / 150


def test_mixed_export_is_closer_to_fp32(mixed, tmp_path):
    """On held-out text (12 windows): less KL from the fp32 export than the same export without the mix
    (measured: 3.37e-3 → 1.99e-3, 0.59x; on all of heldout.txt 0.574x → 0.332x of the builder's int4)."""
    plain, folder, _ = mixed
    rows = heldout_windows_of(TINY_PHI3_DIR, TINY_PHI3_DIR / "heldout.txt", 128)[:12]
    export(TINY_PHI3_DIR, tmp_path / "fp32", ExportOptions(precision="fp32"))
    reference = window_log_probs(tmp_path / "fp32", rows)
    plain_kl, _ = kl_and_top1(reference, window_log_probs(plain, rows))
    mixed_kl, _ = kl_and_top1(reference, window_log_probs(folder, rows))
    print(f"KLD plain {plain_kl.mean():.2e}, mixed {mixed_kl.mean():.2e}")
    assert mixed_kl.mean() < 0.75 * plain_kl.mean()


def test_inspect_shows_the_choice(mixed):
    from phi_onnx.cli import main

    _, folder, record = mixed
    result = CliRunner().invoke(main, ["inspect", str(folder)])
    assert result.exit_code == 0, result.output
    mix = record["mix"]
    assert f"{len(mix['eight_bit'])} of {len(mix['tensors'])} projections at 8 bits" in result.output
    for key in record["mix"]["eight_bit"]:
        assert key in result.output
    data = json.loads(CliRunner().invoke(main, ["inspect", str(folder), "--json"]).output)
    assert data["quantization"]["mix"]["eight_bit"] == record["mix"]["eight_bit"]
    assert data["matmul_nbits_bits"]["8"] == len(record["mix"]["eight_bit"]) + 1  # and the 8-bit LM head


def test_cli_mix_flags(tmp_path):
    from phi_onnx.cli import main

    refused = CliRunner().invoke(main, ["export", str(TINY_PHI3_DIR), "-o", str(tmp_path / "x"),
                                        "--mix-budget", "0.2"])
    assert refused.exit_code == 2 and "--mix auto" in refused.output and "Traceback" not in refused.output
    assert not (tmp_path / "x").exists()
    result = CliRunner().invoke(main, ["export", str(TINY_PHI3_DIR), "-o", str(tmp_path / "m"), "--algo", "rtn",
                                       "--mix", "auto", "--mix-budget", "0.05", "--json"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "m" / "phi_onnx.json").read_text())
    assert (manifest["options"]["mix"], manifest["options"]["mix_budget"]) == ("auto", 0.05)
    mix = manifest["quantization"]["mix"]
    assert mix["added_bytes"] <= 0.05 * mix["base_bytes"] and mix["eight_bit"]
