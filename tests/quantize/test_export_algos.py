"""int4 algorithms through export: options, calibration, manifest record, errors, CLI."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from helpers import OnnxLM, random_ids

from phi_onnx.cli import main
from phi_onnx.errors import OptionsError
from phi_onnx.export import ExportOptions, export
from phi_onnx.quantize.calibration import BUILTIN, load_calibration

TEXTS = ("Return the sum of a and b. Both must be numbers; strings raise TypeError.",
         "Open a file and return a stream. The mode defaults to reading text. " * 12)


def int4_weights(folder) -> dict[str, np.ndarray]:
    model = onnx.load(folder / "model.onnx")
    return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.name.endswith("weight_q4")}


def test_gptq_export_records_calibration_and_runs(make_checkpoint, tmp_path):
    source = make_checkpoint("phi3-gqa")
    out = tmp_path / "gptq"
    export(source, out, ExportOptions(block_size=32, algo="gptq", calibration=list(TEXTS), embeddings="full",
                                      lm_head_bits=4))
    manifest = json.loads((out / "phi_onnx.json").read_text())
    record = manifest["quantization"]
    assert record["algo"] == "gptq" and record["block_size"] == 32 and record["symmetric"] is True
    assert record["calibration"]["sha256"] == hashlib.sha256("\n\n".join(TEXTS).encode()).hexdigest()
    assert record["calibration"]["tokens"] == int(np.prod(record["calibration"]["windows"])) >= 64
    assert manifest["options"]["algo"] == "gptq" and manifest["variant"] == "cpu-int4-gptq-block-32"
    assert manifest["options"]["calibration_tokens"] == 4096  # the default budget, resolved
    logits = OnnxLM(out)(random_ids(12, seed=3))
    assert np.isfinite(logits).all()
    rtn = tmp_path / "rtn"
    export(source, rtn, ExportOptions(block_size=32, algo="rtn", embeddings="full", lm_head_bits=4))
    # no calibration, no budget: rtn's record (and its store key) is what it was before the option existed
    assert "calibration_tokens" not in json.loads((rtn / "phi_onnx.json").read_text())["options"]
    ours, theirs = int4_weights(out), int4_weights(rtn)
    assert ours.keys() == theirs.keys() and len(ours) == 2 * 4 + 1  # qkv, o, gate_up, down per layer; lm_head
    changed = [np.mean(ours[k] != theirs[k]) for k in ours]
    assert min(changed) > 0.05  # every layer, the LM head too, was calibrated (not RTN)


def test_clip_export_is_calibration_free_by_default(make_checkpoint, tmp_path):
    out = tmp_path / "clip"
    export(make_checkpoint("phi3-mha"), out, ExportOptions(block_size=64, symmetric=False, algo="clip"))
    record = json.loads((out / "phi_onnx.json").read_text())["quantization"]
    assert record == {"algo": "clip", "block_size": 64, "symmetric": False, "embeddings": "int8", "lm_head_bits": 8}
    assert np.isfinite(OnnxLM(out)(random_ids(8, seed=1))).all()


def test_clip_with_calibration_weights_its_search(make_checkpoint, tmp_path):
    source = make_checkpoint("phi3-mha")
    export(source, tmp_path / "plain", ExportOptions(algo="clip"))
    export(source, tmp_path / "weighted", ExportOptions(algo="clip", calibration=TEXTS))
    record = json.loads((tmp_path / "weighted" / "phi_onnx.json").read_text())["quantization"]
    assert record["algo"] == "clip" and record["calibration"]["tokens"] > 0 and "damp" not in record
    plain, weighted = int4_weights(tmp_path / "plain"), int4_weights(tmp_path / "weighted")
    assert all(np.mean(plain[k] != weighted[k]) > 0.001 for k in plain)  # the activations changed the choice


def test_builtin_calibration_is_disjoint_from_evaluation_texts(tmp_path):
    from phi_onnx.tiny import TINY_PHI3_DIR

    text = BUILTIN.read_text()
    heldout = (TINY_PHI3_DIR / "heldout.txt").read_text()
    # 200-character windows: chat boilerplate (the system prompt) may repeat, documents may not
    assert not [i for i in range(0, len(text) - 200, 50) if text[i:i + 200] in heldout]
    calibration = load_calibration(None, TINY_PHI3_DIR / "tokenizer.json")
    assert calibration.source == "built-in" and calibration.tokens >= 4096


def test_calibration_errors(tmp_path, make_checkpoint):
    with pytest.raises(OptionsError, match="round-to-nearest"):
        ExportOptions(algo="rtn", calibration="x.txt")
    for algo in ("rtn", "clip"):  # neither calibrates without a text
        with pytest.raises(OptionsError, match="calibration token count"):
            ExportOptions(algo=algo, calibration_tokens=512)  # type: ignore[arg-type]
    assert ExportOptions(algo="clip", calibration="x.txt", calibration_tokens=512).calibration_tokens == 512
    with pytest.raises(OptionsError, match="Unknown int4 algorithm"):
        ExportOptions(algo="awq")  # type: ignore[arg-type]
    with pytest.raises(OptionsError, match="does not exist"):
        export(make_checkpoint("phi3-mha"), tmp_path / "o", ExportOptions(algo="gptq", calibration=str(tmp_path)))
    short = tmp_path / "short.txt"
    short.write_text("too short")
    with pytest.raises(OptionsError, match="at least"):
        export(make_checkpoint("phi3-mha"), tmp_path / "o", ExportOptions(algo="gptq", calibration=str(short)))
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 ".encode("latin-1") * 100)
    with pytest.raises(OptionsError, match="not UTF-8"):
        export(make_checkpoint("phi3-mha"), tmp_path / "o", ExportOptions(algo="gptq", calibration=str(latin)))
    assert not (tmp_path / "o").exists()


def test_cli_export_algo_and_calibration(make_checkpoint, tmp_path):
    text = tmp_path / "cal.txt"
    text.write_text("\n\n".join(TEXTS))
    out = tmp_path / "cli"
    result = CliRunner().invoke(main, ["export", str(make_checkpoint("phi3-mha")), "-o", str(out), "--algo", "gptq",
                                       "--block-size", "64", "--calibration", str(text), "--calibration-tokens", "128"])
    assert result.exit_code == 0, result.output
    assert "gptq-block-64" in result.output
    manifest = json.loads((out / "phi_onnx.json").read_text())
    record = manifest["quantization"]
    assert record["calibration"]["source"] == str(text.resolve())
    whole = load_calibration(str(text), make_checkpoint("phi3-mha") / "tokenizer.json")
    assert whole.tokens > 128 and record["calibration"]["tokens"] == 128  # the text, cut to the budget
    assert manifest["options"]["calibration_tokens"] == 128
    few = CliRunner().invoke(main, ["export", str(make_checkpoint("phi3-mha")), "-o", str(tmp_path / "few"),
                                    "--algo", "gptq", "--calibration-tokens", "10"])
    assert few.exit_code == 2 and "calibration token count 10" in few.output and "Traceback" not in few.output
    assert not (tmp_path / "few").exists()
    bad = CliRunner().invoke(main, ["export", str(make_checkpoint("phi3-mha")), "-o", str(tmp_path / "bad"),
                                    "--calibration", str(text)])
    assert bad.exit_code == 2 and "round-to-nearest" in bad.output and "Traceback" not in bad.output


def test_gptq_for_cuda_calibrates_on_cpu_with_fp16_scales(make_checkpoint, tmp_path):
    """A CUDA export stores fp16 scales: GPTQ rounds on that grid, calibrating on the CPU in fp32."""
    out = tmp_path / "cuda"
    export(make_checkpoint("phi3-mha"), out, ExportOptions(device="cuda", algo="gptq", block_size=64,
                                                          calibration=TEXTS))
    model = onnx.load(out / "model.onnx")
    scales = [onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.name.endswith("weight_scales")]
    assert scales and all(s.dtype == np.float16 for s in scales)
    ids = random_ids(10, seed=2)
    assert np.isfinite(OnnxLM(out)(ids)).all()  # CUDA exports run on CPU ORT too
