"""What the exported folder and graph hold: fused ops, names, IO, manifest, CUDA variants."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import onnx
import pytest
import torch
from helpers import OnnxLM, assert_cuda_io, op_counts, random_ids


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_fused_ops_and_no_decomposed_attention(precision, make_export):
    counts = op_counts(make_export("phi3-gqa", precision))
    assert counts["GroupQueryAttention"] == 2
    assert counts["SkipSimplifiedLayerNormalization"] == 4  # 2 per layer, the final one fused too
    assert counts["SimplifiedLayerNormalization"] == 1
    assert counts["Softmax"] == 0
    linear = "MatMulNBits" if precision == "int4" else "MatMul"
    assert counts[linear] == 2 * 4 + 1  # packed qkv, o, packed gate_up, down per layer + LM head
    if precision == "int4":
        assert counts["MatMul"] == 0


def test_node_names_and_io(make_export):
    model = onnx.load(make_export("phi3-mha") / "model.onnx", load_external_data=False)
    names = {n.name for n in model.graph.node}
    assert "/model/layers.1/attn/qkv_proj/MatMul" in names
    assert "/model/layers.0/attn/GroupQueryAttention" in names
    assert "/model/layers.0/mlp/down_proj/MatMul" in names
    assert "/lm_head/MatMul" in names
    inputs = [i.name for i in model.graph.input]
    assert inputs[:2] == ["input_ids", "attention_mask"]
    assert "past_key_values.1.value" in inputs
    outputs = [o.name for o in model.graph.output]
    assert outputs[0] == "logits" and "present.1.key" in outputs


def test_rotary_outside_gqa_when_not_fusable(make_export):
    """rotary_dim 24 → cos width 12, not a multiple of 8: rotary is built from standard ops."""
    model = onnx.load(make_export("phi3-rot24") / "model.onnx", load_external_data=False)
    gqa = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    assert all(next(a.i for a in n.attribute if a.name == "do_rotary") == 0 for n in gqa)
    fused = onnx.load(make_export("phi4mini") / "model.onnx", load_external_data=False)
    gqa = [n for n in fused.graph.node if n.op_type == "GroupQueryAttention"]
    assert all(next(a.i for a in n.attribute if a.name == "do_rotary") == 1 for n in gqa)


def test_no_large_rotary_cache_is_stored(make_export):
    """cos/sin are computed in the graph: a 512-position LongRoPE model stores no [512, d] tables."""
    model = onnx.load(make_export("phi4mini") / "model.onnx", load_external_data=False)
    shapes = [tuple(t.dims) for t in model.graph.initializer]
    assert not any(len(s) == 2 and s[0] == 512 for s in shapes)


def test_tied_embeddings_export_without_lm_head_tensor(make_checkpoint, make_export):
    from safetensors import safe_open

    with safe_open(make_checkpoint("phi4mini") / "model.safetensors", "np") as f:
        names = list(f.keys())
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    assert op_counts(make_export("phi4mini"))["MatMul"] == 2 * 4 + 1


def test_manifest_records_source_options_and_hashes(make_checkpoint, make_export):
    folder = make_export("phi3-mha", "int4", block_size=64)
    manifest = json.loads((folder / "phi_onnx.json").read_text())
    assert manifest["source"]["architecture"] == "Phi3ForCausalLM"
    weights = make_checkpoint("phi3-mha") / "model.safetensors"
    digest = hashlib.sha256(b"model.safetensors" + weights.read_bytes()).hexdigest()
    assert manifest["source"]["weights_sha256"] == digest
    assert manifest["options"]["block_size"] == 64 and manifest["options"]["precision"] == "int4"
    assert manifest["variant"] == "cpu-int4-rtn-block-64"
    assert "onnxruntime" in manifest["tools"] and "onnx" in manifest["tools"]
    for name in ("model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json"):
        assert manifest["files"][name] == hashlib.sha256((folder / name).read_bytes()).hexdigest()
    assert manifest["graph"]["op_counts"]["com.microsoft.MatMulNBits"] == 9


def test_tokenizer_and_chat_template_copied(make_export):
    folder = make_export("phi3-mha")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    template = config.get("chat_template") or (folder / "chat_template.jinja").read_text()
    assert "<|assistant|>" in template


@pytest.mark.parametrize("precision", ["fp16", "int4"])
def test_cuda_variants_built_and_checked_on_cpu(precision, make_checkpoint, make_export, reference_model):
    """CUDA exports use fp16 activations and KV cache; ORT's CPU kernels can still run them."""
    folder = make_export("phi3-gqa", precision, device="cuda")
    assert_cuda_io(folder)
    genai = json.loads((folder / "genai_config.json").read_text())
    assert genai["model"]["decoder"]["session_options"]["provider_options"] == [
        {"cuda": {"enable_cuda_graph": "0"}}]
    ids = random_ids(16, seed=9)
    with torch.no_grad():
        expected = reference_model(make_checkpoint("phi3-gqa"))(torch.from_numpy(ids)).logits.numpy()
    got = OnnxLM(folder)(ids)
    tolerance = 2e-2 if precision == "fp16" else 1.0  # fp16 rounding; int4 only needs to be sane
    assert np.abs(got - expected).max() <= tolerance
    if precision == "fp16":
        assert (got.argmax(-1) == expected.argmax(-1)).mean() >= 0.9
