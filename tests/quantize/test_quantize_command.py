"""`phi-onnx quantize`: an fp32 folder (phi-onnx's or another tool's) to int4 in a new folder."""

from __future__ import annotations

import errno
import json
import os
import shutil

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from helpers import OnnxLM, random_ids
from onnx import TensorProto, helper, numpy_helper

from phi_onnx.cli import main
from phi_onnx.errors import OutputExistsError, UnsupportedModelError
from phi_onnx.export import ExportOptions, export
from phi_onnx.quantize import dequantize_int4
from phi_onnx.quantize.int4 import Int4Weight
from phi_onnx.quantize.onnx_model import quantize_folder


def nbits_initializers(folder) -> list[np.ndarray]:
    model = onnx.load(folder / "model.onnx")
    inits = {t.name: t for t in model.graph.initializer}
    arrays = []
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            arrays += [numpy_helper.to_array(inits[name]) for name in node.input[1:]]
    return arrays


@pytest.mark.parametrize(("algo", "block", "symmetric"), [("clip", 32, True), ("rtn", 64, False)])
def test_quantized_fp32_export_equals_int4_export(make_export, make_checkpoint, tmp_path, algo, block, symmetric):
    fp32 = make_export("phi3-mha")
    out = tmp_path / "q"
    result = CliRunner().invoke(main, ["quantize", str(fp32), str(out), "--algo", algo, "--block-size", str(block),
                                       *([] if symmetric else ["--asymmetric"])])
    assert result.exit_code == 0, result.output
    assert "9 MatMuls as int4" in result.output  # 4 per layer x 2 layers + the LM head
    direct = tmp_path / "direct"
    export(make_checkpoint("phi3-mha"), direct, ExportOptions(algo=algo, block_size=block, symmetric=symmetric,
                                                              embeddings="full", lm_head_bits=4))
    ours, theirs = nbits_initializers(out), nbits_initializers(direct)
    assert len(ours) == len(theirs) == 9 * (2 if symmetric else 3)
    assert all(np.array_equal(a, b) for a, b in zip(ours, theirs, strict=True))
    ids = random_ids(10, seed=4)
    np.testing.assert_allclose(OnnxLM(out)(ids), OnnxLM(direct)(ids), atol=1e-4)
    manifest = json.loads((out / "phi_onnx.json").read_text())
    assert manifest["options"]["precision"] == "int4" and manifest["quantization"]["algo"] == algo
    assert manifest["quantization"]["quantized_from"] == str(fp32)
    assert set(manifest["files"]) == {p.name for p in out.iterdir() if p.name != "phi_onnx.json"}
    assert (fp32 / "model.onnx").is_file() and not any(p.name.startswith(".") for p in tmp_path.iterdir())


def foreign_model(folder) -> tuple[np.ndarray, np.ndarray]:
    """An Optimum-like graph without a manifest: y = relu(x @ W1) @ W2 + (x @ x^T)-free branch."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((64, 96)).astype(np.float32)
    w2 = rng.standard_normal((96, 32)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2"),
             helper.make_node("MatMul", ["x", "xt"], ["gram"], name="gram")]
    graph = helper.make_graph(
        nodes, "foreign",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64]),
         helper.make_tensor_value_info("xt", TensorProto.FLOAT, [64, "n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 32]),
         helper.make_tensor_value_info("gram", TensorProto.FLOAT, ["n", "n"])],
        initializer=[numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    folder.mkdir()
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), folder / "model.onnx")
    (folder / "tokenizer.json").write_text("{}")
    return w1, w2


def test_any_onnx_model_with_constant_matmul_weights(tmp_path):
    w1, _ = foreign_model(tmp_path / "in")
    result = quantize_folder(tmp_path / "in", tmp_path / "out", algo="clip", block_size=32)
    assert sorted(result.quantized) == ["fc1", "fc2"]
    assert result.kept == {"gram": "its weight is computed, not a constant"}
    assert (tmp_path / "out" / "tokenizer.json").is_file() and not (tmp_path / "out" / "phi_onnx.json").exists()
    session = ort.InferenceSession(str(tmp_path / "out" / "model.onnx"), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((5, 64)).astype(np.float32)
    y, gram = session.run(["y", "gram"], {"x": x, "xt": x.T.copy()})
    np.testing.assert_allclose(gram, x @ x.T, rtol=1e-5, atol=1e-4)
    packed = nbits_initializers(tmp_path / "out")
    w1q = dequantize_int4(Int4Weight(packed[0], packed[1], None, 96, 64, 32)).T
    w2q = dequantize_int4(Int4Weight(packed[2], packed[3], None, 32, 96, 32)).T
    assert np.abs(w1q - w1).max() < np.abs(w1).max() / 4  # a real quantization of w1
    # accuracy level 4 (int8 activations) on CPU: close to the dequantized weights' product, not equal
    assert np.abs(y - np.maximum(x @ w1q, 0) @ w2q).max() < 0.03 * np.abs(y).max()


def test_refusals(tmp_path, make_export):
    foreign_model(tmp_path / "in")
    runner = CliRunner()
    gptq = runner.invoke(main, ["quantize", str(tmp_path / "in"), str(tmp_path / "g"), "--algo", "gptq"])
    assert gptq.exit_code == 2 and "layer structure" in gptq.output and "--algo clip" in gptq.output
    (tmp_path / "exists").mkdir()
    with pytest.raises(OutputExistsError):
        quantize_folder(tmp_path / "in", tmp_path / "exists")
    with pytest.raises(UnsupportedModelError, match="already quantized"):
        quantize_folder(make_export("phi3-mha", "int4"), tmp_path / "again")
    only_dynamic = tmp_path / "dyn"
    only_dynamic.mkdir()
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "g",
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, [4, 4]) for n in "ab"],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, [4, 4])])
    onnx.save(helper.make_model(graph), only_dynamic / "model.onnx")
    result = runner.invoke(main, ["quantize", str(only_dynamic), str(tmp_path / "d")])
    assert result.exit_code == 2 and "no MatMul with a constant float weight" in result.output
    assert not (tmp_path / "g").exists() and not (tmp_path / "d").exists() and not (tmp_path / "again").exists()


def test_output_paths_that_cannot_be_written_are_clean_errors(tmp_path):
    foreign_model(tmp_path / "in")
    (tmp_path / "afile").write_text("mine")
    runner = CliRunner()
    in_file = runner.invoke(main, ["quantize", str(tmp_path / "in"), str(tmp_path / "afile" / "q")])
    assert in_file.exit_code == 2 and "is a file, not a folder" in in_file.output
    assert "Traceback" not in in_file.output and (tmp_path / "afile").read_text() == "mine"
    (tmp_path / "exists").mkdir()
    exists = runner.invoke(main, ["quantize", str(tmp_path / "in"), str(tmp_path / "exists")])
    assert exists.exit_code == 2 and "already exists" in exists.output and "--overwrite" not in exists.output
    nested = runner.invoke(main, ["quantize", str(tmp_path / "in"), str(tmp_path / "new" / "deep" / "q")])
    assert nested.exit_code == 0, nested.output
    assert (tmp_path / "new" / "deep" / "q" / "model.onnx").is_file()
    assert sorted(p.name for p in (tmp_path / "new" / "deep").iterdir()) == ["q"]

def test_gptq_on_a_phi_onnx_export_reexports_from_its_checkpoint(make_checkpoint, tmp_path):
    source = tmp_path / "ckpt"
    shutil.copytree(make_checkpoint("phi3-mha"), source)
    export(source, tmp_path / "fp32", ExportOptions(precision="fp32"))
    result = quantize_folder(tmp_path / "fp32", tmp_path / "gptq", algo="gptq", block_size=64)
    assert result.reexported
    manifest = json.loads((tmp_path / "gptq" / "phi_onnx.json").read_text())
    assert manifest["quantization"]["algo"] == "gptq" and manifest["quantization"]["calibration"]["tokens"] > 0
    (source / "model.safetensors").write_bytes((source / "model.safetensors").read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(Exception, match="changed since"):
        quantize_folder(tmp_path / "fp32", tmp_path / "gptq2", algo="gptq")


def external_model(folder, location: str, data: bytes | None = None) -> None:
    """foreign_model's graph with w1 kept in an external file at `location` (relative to `folder`)."""
    w1, _ = foreign_model(folder)
    model = onnx.load(folder / "model.onnx")
    tensor = next(t for t in model.graph.initializer if t.name == "w1")
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(w1.nbytes))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    onnx.save(model, folder / "model.onnx")
    if data is not None:
        target = folder / location
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data or w1.tobytes())  # b"": the real weights


def refused(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)
    assert "Traceback" not in result.output


@pytest.mark.parametrize(("case", "needles"), [
    ("garbage", ["is not a readable ONNX model (Error parsing message", "saved by ONNX"]),
    ("outside", ["keeps tensor 'w1' in '../outside.bin', outside its folder", "move the data file in"]),
    ("missing", ["keeps tensor 'w1' in 'w1.bin', which cannot be read (No such file or directory)",
                 "Copy the model's data file"]),
    ("truncated", ["keeps tensor 'w1' in 'w1.bin', which ends at byte 100, before the tensor does (24576)",
                   "truncated"]),
])
def test_a_model_that_cannot_be_read_is_refused_before_anything_is_written(tmp_path, case, needles):
    src = tmp_path / "in"
    if case == "garbage":
        src.mkdir()
        (src / "model.onnx").write_bytes(b"\x08garbage, not a protobuf\xff\xff")
    elif case == "outside":
        external_model(src, "../outside.bin")
        (tmp_path / "outside.bin").write_bytes(np.zeros(64 * 96, np.float32).tobytes())
    elif case == "missing":
        external_model(src, "w1.bin")
    else:
        external_model(src, "w1.bin", b"\0" * 100)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    result = CliRunner().invoke(main, ["quantize", str(src), str(tmp_path / "out")])
    refused(result, *needles)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written, nothing hidden


def test_external_data_inside_the_folder_is_read(tmp_path):
    external_model(tmp_path / "in", "weights/w1.bin", b"")
    result = CliRunner().invoke(main, ["quantize", str(tmp_path / "in"), str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "2 MatMuls as int4" in result.output


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_an_output_where_nothing_can_be_created_is_a_clean_error(tmp_path):
    foreign_model(tmp_path / "in")
    result = CliRunner().invoke(main, ["quantize", str(tmp_path / "in"), "/proc/phi-onnx-quantized"])
    refused(result, "Cannot write to /proc", "No such file or directory", "ordinary writable disk")
    assert not os.path.exists("/proc/phi-onnx-quantized")
    home = CliRunner().invoke(main, ["quantize", str(tmp_path / "in"), "~nosuchuser-phi-onnx/q"])
    refused(home, "The output folder '~nosuchuser-phi-onnx/q'", "no user 'nosuchuser-phi-onnx'")


@pytest.mark.parametrize(("error", "code", "needles"), [
    (KeyboardInterrupt(), 130, ["Interrupted; the output folder was not created."]),
    (OSError(errno.ENOSPC, "No space left on device"), 2, ["The disk is full", "Nothing was left behind"]),
])
def test_quantize_stages_its_output_like_export(tmp_path, monkeypatch, error, code, needles):
    """quantize writes through export's staged_output: an interruption or a full disk leaves nothing."""
    foreign_model(tmp_path / "in")
    real_save = ir.save

    def fails(model, path, **kwargs):
        real_save(model, path, **kwargs)  # a half-written staging folder, then
        raise error

    monkeypatch.setattr(ir, "save", fails)
    result = CliRunner().invoke(main, ["quantize", str(tmp_path / "in"), str(tmp_path / "out")])
    assert result.exit_code == code, result.output
    assert all(needle in result.stderr for needle in needles) and "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # no output, no hidden staging folder
