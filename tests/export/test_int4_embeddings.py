"""int4 exports' quantized embedding (GatherBlockQuantized), shared tied table and 8-bit LM head."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from helpers import OnnxLM, genai_greedy, op_counts, prompt_then_decode, random_ids
from onnx import TensorProto, helper, numpy_helper

from phi_onnx.errors import OptionsError
from phi_onnx.export import ExportOptions
from phi_onnx.quantize import dequantize_int4, quantize_int4
from phi_onnx.quantize.embedding import dequantize_table, quantize_table
from phi_onnx.runtime.logits_to_keep import add_logits_to_keep


def one_node(node: onnx.NodeProto, inits: list[np.ndarray], names: list[str], feed: str, feed_dtype: int,
             feed_shape: list[int]) -> ort.InferenceSession:
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(feed, feed_dtype, feed_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=[numpy_helper.from_array(a, n) for a, n in zip(inits, names, strict=True)])
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=10)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def table_inputs(q, two_d: bool) -> tuple[list[np.ndarray], list[str]]:
    packed = q.packed.reshape(q.n, -1) if two_d else q.packed
    inits, names = [packed, q.scales], ["data", "scales"]
    if q.zero_points is not None:
        inits.append(q.zero_points)
        names.append("zero_points")
    return inits, names


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize(("k", "block_size"), [(256, 16), (256, 32), (192, 64), (256, 128), (512, 256), (200, 32)])
def test_gather_block_quantized_rows_equal_the_dequantized_table(bits, symmetric, k, block_size):
    rng = np.random.default_rng(bits * 1000 + k + block_size)
    q = quantize_table(rng.standard_normal((37, k)).astype(np.float32), bits, block_size, symmetric)
    inits, names = table_inputs(q, two_d=True)
    node = helper.make_node("GatherBlockQuantized", [names[0], "ids", *names[1:]], ["y"], domain="com.microsoft",
                            bits=bits, block_size=block_size, gather_axis=0, quantize_axis=1)
    ids = np.array([[0, 5, 36, 5], [1, 2, 3, 36]], np.int64)
    got = one_node(node, inits, names, "ids", TensorProto.INT64, [2, 4]).run(None, {"ids": ids})[0]
    # K not a multiple of the block: the kernel returns the padded width; the export slices it.
    assert np.array_equal(got[..., :k], dequantize_table(q)[ids])


@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_table_is_the_matmul_nbits_weight(symmetric):
    """4 bits: the same rounding and bytes as the layers' MatMulNBits weights (so a tied head can share)."""
    w = np.random.default_rng(1).standard_normal((40, 96)).astype(np.float32)
    q, ref = quantize_table(w, 4, 32, symmetric), quantize_int4(w, 32, symmetric)
    assert np.array_equal(q.packed, ref.packed)
    assert np.array_equal(dequantize_table(q), dequantize_int4(ref))


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("block_size", [16, 64, 256])
def test_matmul_nbits_8_bits_multiplies_by_the_dequantized_table(symmetric, block_size):
    rng = np.random.default_rng(block_size)
    w = rng.standard_normal((48, 256)).astype(np.float32)
    q = quantize_table(w, 8, block_size, symmetric)
    inits, names = table_inputs(q, two_d=False)
    node = helper.make_node("MatMulNBits", ["x", *names], ["y"], domain="com.microsoft", K=256, N=48, bits=8,
                            block_size=block_size, accuracy_level=1)
    x = rng.standard_normal((1, 3, 256)).astype(np.float32)
    got = one_node(node, inits, names, "x", TensorProto.FLOAT, [1, 3, 256]).run(None, {"x": x})[0]
    table = dequantize_table(q)
    np.testing.assert_allclose(got, x @ table.T, atol=1e-4)
    assert np.abs(table - w).max() < np.abs(dequantize_int4(quantize_int4(w, block_size, symmetric)) - w).max() / 4


def initializer_names(folder) -> list[str]:
    return [init.name for init in onnx.load(folder / "model.onnx", load_external_data=False).graph.initializer]


def consumers(folder, name: str) -> set[str]:
    graph = onnx.load(folder / "model.onnx", load_external_data=False).graph
    return {node.op_type for node in graph.node if name in node.input}


@pytest.mark.parametrize("algo", ["rtn", "clip"])
def test_tied_model_stores_one_8_bit_table_by_default(make_export, algo):
    """The default (int8 embedding, 8-bit head) shares one table whatever the layers' algorithm: 8-bit tables
    round to nearest."""
    folder = make_export("phi4mini", "int4", algo=algo)
    names = initializer_names(folder)
    tables = [n for n in names if "embed_tokens" in n or n.startswith("lm_head")]
    assert tables == ["model.embed_tokens.q8.weight", "model.embed_tokens.q8.scales"]
    assert consumers(folder, "model.embed_tokens.q8.weight") == {"MatMulNBits", "Reshape"}
    assert consumers(folder, "model.embed_tokens.q8.scales") == {"MatMulNBits", "GatherBlockQuantized"}


def test_tied_model_stores_one_int4_table(make_export):
    folder = make_export("phi4mini", "int4", algo="rtn", embeddings="int4", lm_head_bits=4)
    names = initializer_names(folder)
    tables = [n for n in names if "embed_tokens" in n or n.startswith("lm_head")]
    assert tables == ["model.embed_tokens.q4.weight", "model.embed_tokens.q4.scales"]
    assert consumers(folder, "model.embed_tokens.q4.weight") == {"MatMulNBits", "Reshape"}
    assert consumers(folder, "model.embed_tokens.q4.scales") == {"MatMulNBits", "GatherBlockQuantized"}
    full = make_export("phi4mini", "int4", algo="rtn", embeddings="full", lm_head_bits=4)
    assert op_counts(folder)["Gather"] < op_counts(full)["Gather"]


def test_tied_model_with_other_head_bits_stores_two_tables(make_export):
    folder = make_export("phi4mini", "int4", embeddings="int4", lm_head_bits=8)
    assert {n for n in initializer_names(folder) if ".q" in n and ("embed" in n or "lm_head" in n)} == {
        "model.embed_tokens.q4.weight", "model.embed_tokens.q4.scales",
        "model.embed_tokens.q8.weight", "model.embed_tokens.q8.scales"}


def fake_quantized(model, options: ExportOptions):
    """The reference with the export's rounding: int4 projections, the embedding and head as exported."""
    block, sym = options.block_size, options.symmetric
    emb_bits = {"int4": 4, "int8": 8}.get(options.resolved_embeddings)
    embedding = model.get_input_embeddings().weight.detach().numpy()
    head = model.get_output_embeddings().weight.detach().numpy()
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            w = dequantize_table(quantize_table(module.weight.detach().numpy(), 4, block, sym))
            module.weight = torch.nn.Parameter(torch.from_numpy(w))  # a new tensor also unties lm_head
    model.lm_head.weight = torch.nn.Parameter(torch.from_numpy(
        dequantize_table(quantize_table(head, options.resolved_lm_head_bits, block, sym))))
    if emb_bits is not None:
        model.get_input_embeddings().weight = torch.nn.Parameter(torch.from_numpy(
            dequantize_table(quantize_table(embedding, emb_bits, block, sym))))
    return model


@pytest.mark.parametrize(("name", "options"), [
    ("phi4mini", {"block_size": 32, "embeddings": "int4", "lm_head_bits": 4}),
    ("phi4mini", {"block_size": 64, "symmetric": False, "lm_head_bits": 8, "embeddings": "int8"}),
    ("phi3-mha", {"block_size": 16, "symmetric": False}),  # the default tables: int8 embedding, 8-bit head
    ("phi3-gqa", {"block_size": 32, "embeddings": "int4", "lm_head_bits": 8}),
])
def test_export_matches_quantization_aware_reference(name, options, make_checkpoint, make_export):
    from transformers import AutoModelForCausalLM

    options = {"algo": "rtn", **options}  # the reference rounds the projections to nearest
    opts = ExportOptions(precision="int4", accuracy_level=1, **options)
    model = AutoModelForCausalLM.from_pretrained(make_checkpoint(name), dtype=torch.float32).eval()
    reference = fake_quantized(model, opts)
    ids = random_ids(20, seed=4)
    with torch.no_grad():
        expected = reference(torch.from_numpy(ids)).logits.numpy()
    got = prompt_then_decode(make_export(name, "int4", accuracy_level=1, **options), ids, prompt_len=12)
    assert np.abs(got - expected).max() <= 2e-4


def test_quantized_embedding_differs_from_full(make_export):
    """Guards the test above: the embedding's rounding is visible in the logits."""
    ids = random_ids(8, seed=3)
    full = OnnxLM(make_export("phi3-mha", "int4", embeddings="full", accuracy_level=1))(ids)
    quantized = OnnxLM(make_export("phi3-mha", "int4", embeddings="int4", accuracy_level=1))(ids)
    assert np.abs(full - quantized).max() > 1e-3


@pytest.mark.parametrize(("name", "options"), [("phi4mini", {"embeddings": "int4", "lm_head_bits": 4}),
                                               ("phi3-mha", {"embeddings": "int4", "lm_head_bits": 8}),
                                               ("phi4mini", {})])  # the default: one shared 8-bit table
def test_backends_generate_the_same_tokens(name, options, make_export):
    import phi_onnx

    pytest.importorskip("onnxruntime_genai")
    folder = make_export(name, "int4", **options)
    assert add_logits_to_keep(folder / "model.onnx") is not None  # the ort backend finds the MatMulNBits head
    prompt = random_ids(10, seed=8)
    theirs = genai_greedy(folder, prompt, 12)
    with phi_onnx.load(folder, device="cpu", backend="ort") as model:
        ours = model.generate(prompt[0].tolist(), max_new_tokens=12, min_new_tokens=12).token_ids
    assert ours == theirs


def test_options_are_validated_and_recorded():
    with pytest.raises(OptionsError, match="int4 exports"):
        ExportOptions(precision="fp32", embeddings="int4")
    with pytest.raises(OptionsError, match="LM head bits"):
        ExportOptions(lm_head_bits=6)
    with pytest.raises(OptionsError, match="embeddings"):
        ExportOptions(embeddings="int2")  # type: ignore[arg-type]
    assert (ExportOptions().to_dict()["embeddings"], ExportOptions().to_dict()["lm_head_bits"]) == ("int8", 8)
    assert (ExportOptions(precision="fp32").to_dict()["embeddings"],
            ExportOptions(precision="fp32").to_dict()["lm_head_bits"]) == ("full", 4)  # as recorded before
    assert ExportOptions(lm_head_bits=4).to_dict()["lm_head_bits"] == 4


def test_cli_flags_reach_the_manifest(tmp_path):
    from click.testing import CliRunner

    from phi_onnx.cli import main
    from phi_onnx.manifest import read_manifest
    from phi_onnx.tiny import TINY_PHI3_DIR

    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["export", str(TINY_PHI3_DIR), "-o", str(out), "--embeddings", "int4",
                                       "--lm-head-bits", "4"])
    assert result.exit_code == 0, result.output
    options = read_manifest(out)["options"]  # type: ignore[index]
    assert (options["embeddings"], options["lm_head_bits"]) == ("int4", 4)
    assert op_counts(out)["GatherBlockQuantized"] == 1
    refused = CliRunner().invoke(main, ["export", str(TINY_PHI3_DIR), "-o", str(tmp_path / "x"), "--precision",
                                        "fp32", "--lm-head-bits", "8"])
    assert refused.exit_code == 2 and "int4 exports" in refused.output
