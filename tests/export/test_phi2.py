"""Phi-2 (`PhiForCausalLM`): fp32 parity, onnxruntime-genai greedy, int4 exactness, graph, CUDA variants."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from helpers import (
    OnnxLM,
    assert_cuda_io,
    cached_exports,
    genai_greedy,
    op_counts,
    prompt_then_decode,
    random_ids,
    save_tiny_checkpoint,
    transformers_greedy,
)

from phi_onnx.quantize import dequantize_int4, quantize_int4

TOL = 1e-4

#: Tiny PhiConfig overrides. No linear width equals the vocab size (1040).
PHI2_CHECKPOINTS: dict[str, dict[str, Any]] = {
    # Phi-2's shape in small: head_dim 80, partial rotary 0.4 → 32 channels, fused into GQA.
    "phi2": {},
    # head_dim 40 with rotary 0.5 → 20 channels (cos width 10, not a multiple of 8): rotary as ops;
    # GQA with 2 KV heads and another rotary base.
    "phi2-rot-ops": {"num_attention_heads": 4, "num_key_value_heads": 2, "partial_rotary_factor": 0.5,
                     "rope_theta": 5000.0},
    # Phi-2's residual stream runs far from zero; an embedding offset of 30 makes every LayerNorm
    # input do so, where a one-pass variance (SkipLayerNormalization) would lose digits.
    "phi2-offset": {},
}

BASE_CONFIG: dict[str, Any] = {
    "vocab_size": 1040, "hidden_size": 160, "num_hidden_layers": 2, "num_attention_heads": 2,
    "intermediate_size": 384, "partial_rotary_factor": 0.4, "max_position_embeddings": 2048,
    "layer_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 3, "pad_token_id": 3,
}


@pytest.fixture(scope="session")
def phi2_checkpoint(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Callable[[str], Path]:
    """`phi2_checkpoint(name)` → folder of a saved random Phi-2 (cached per name)."""
    cache: dict[str, Path] = {}

    def make(name: str) -> Path:
        if name not in cache:
            from transformers import PhiConfig, PhiForCausalLM

            torch.manual_seed(sum(map(ord, name)))
            model = PhiForCausalLM(PhiConfig(**{**BASE_CONFIG, **PHI2_CHECKPOINTS[name]})).eval()
            if name == "phi2-offset":
                with torch.no_grad():
                    model.model.embed_tokens.weight += 30.0
            cache[name] = save_tiny_checkpoint(model, tmp_path_factory.mktemp(name), tokenizer_dir,
                                               eos=("<|endoftext|>",))
        return cache[name]

    return make


@pytest.fixture(scope="session")
def phi2_export(tmp_path_factory: pytest.TempPathFactory,
                phi2_checkpoint: Callable[[str], Path]) -> Callable[..., Path]:
    """`phi2_export(name, precision="fp32", **options)` → exported folder (cached)."""
    return cached_exports(tmp_path_factory, phi2_checkpoint)


def reference_logits(folder: Path, ids: np.ndarray) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.from_numpy(ids)).logits.numpy()




@pytest.mark.parametrize("name", ["phi2", "phi2-rot-ops"])
def test_prompt_and_decode_match_transformers(name, phi2_checkpoint, phi2_export):
    ids = random_ids(24, seed=1)
    expected = reference_logits(phi2_checkpoint(name), ids)
    got = prompt_then_decode(phi2_export(name), ids, prompt_len=12)  # 12 decode steps use the cache
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= TOL


def test_layer_norms_exact_far_from_zero(phi2_checkpoint, phi2_export):
    """With the residual stream around 30, fp32 itself is the limit (transformers' fp32 logits are
    1.0e-4 from float64 here), so the export is held to float64: at least as close as transformers.
    Measured: LayerNormalization 4.2e-5, SkipLayerNormalization in its place 3.1e-4."""
    from transformers import AutoModelForCausalLM

    folder, ids = phi2_checkpoint("phi2-offset"), random_ids(24, seed=1)
    exact = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()
    with torch.no_grad():
        expected = exact(torch.from_numpy(ids)).logits.numpy()
    got = prompt_then_decode(phi2_export("phi2-offset"), ids, prompt_len=12)
    assert np.abs(got - expected).max() <= np.abs(reference_logits(folder, ids) - expected).max()


def test_the_offset_reaches_the_layer_norms(phi2_checkpoint):
    """Guards phi2-offset: its embeddings (the first LayerNorm's input) really sit around 30."""
    from safetensors import safe_open

    with safe_open(phi2_checkpoint("phi2-offset") / "model.safetensors", "np") as f:
        assert f.get_tensor("model.embed_tokens.weight").mean() > 29


def test_graph_ops_and_rotary_placement(phi2_export):
    counts = op_counts(phi2_export("phi2"))
    assert counts["GroupQueryAttention"] == 2 and counts["FastGelu"] == 2
    assert counts["LayerNormalization"] == 3  # one per layer (shared by attention and MLP) + final
    assert counts["SkipLayerNormalization"] == 0 and counts["Softmax"] == 0
    assert counts["MatMul"] == 2 * 4 + 1  # packed qkv, dense, fc1, fc2 per layer + LM head
    for name, fused in [("phi2", 1), ("phi2-rot-ops", 0)]:
        model = onnx.load(phi2_export(name) / "model.onnx", load_external_data=False)
        gqa = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
        assert all(next(a.i for a in n.attribute if a.name == "do_rotary") == fused for n in gqa)


def test_ort_optimizer_keeps_plain_layer_norms(phi2_export, tmp_path):
    """ORT fuses Add → LayerNormalization into SkipLayerNormalization (one-pass variance); the
    residual Sum keeps it from doing so in the graph ORT actually runs."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(phi2_export("phi2") / "model.onnx"), options, providers=["CPUExecutionProvider"])
    ops = Counter(n.op_type for n in onnx.load(tmp_path / "optimized.onnx", load_external_data=False).graph.node)
    assert ops["SkipLayerNormalization"] == 0 and ops["LayerNormalization"] == 3


def test_genai_config(phi2_export):
    cfg = json.loads((phi2_export("phi2") / "genai_config.json").read_text())
    assert cfg["model"]["type"] == "phi"
    assert cfg["model"]["decoder"]["head_size"] == 80
    assert cfg["search"]["max_length"] == 2048


def test_genai_greedy_equals_transformers(phi2_checkpoint, phi2_export):
    pytest.importorskip("onnxruntime_genai")
    from transformers import AutoModelForCausalLM

    prompt, new_tokens = random_ids(16, seed=7), 32
    model = AutoModelForCausalLM.from_pretrained(phi2_checkpoint("phi2-rot-ops"), dtype=torch.float32).eval()
    expected = transformers_greedy(model, prompt, new_tokens)
    assert genai_greedy(phi2_export("phi2-rot-ops"), prompt, new_tokens) == expected


def fake_quantized(model, block_size: int, symmetric: bool):
    """The reference with every Linear (q, k, v, dense, fc1, fc2, LM head) and the embedding replaced by
    its int4 round trip."""
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            q = dequantize_int4(quantize_int4(module.weight.detach().numpy(), block_size, symmetric))
            module.weight = torch.nn.Parameter(torch.from_numpy(q))
    embedding = model.get_input_embeddings()  # int4 exports quantize the embedding table the same way
    table = dequantize_int4(quantize_int4(embedding.weight.detach().numpy(), block_size, symmetric))
    embedding.weight = torch.nn.Parameter(torch.from_numpy(table))
    return model


@pytest.mark.parametrize(("name", "block_size", "symmetric"), [("phi2", 32, True), ("phi2-rot-ops", 16, False)])
def test_int4_matches_quantization_aware_reference(name, block_size, symmetric, phi2_checkpoint, phi2_export):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(phi2_checkpoint(name), dtype=torch.float32).eval()
    reference = fake_quantized(model, block_size, symmetric)
    ids = random_ids(20, seed=11)
    with torch.no_grad():
        expected = reference(torch.from_numpy(ids)).logits.numpy()
    folder = phi2_export(name, "int4", block_size=block_size, symmetric=symmetric, accuracy_level=1,
                         embeddings="int4", lm_head_bits=4)  # the tables as the reference rounds them
    assert op_counts(folder)["MatMulNBits"] == 2 * 4 + 1 and op_counts(folder)["MatMul"] == 0
    got = prompt_then_decode(folder, ids, prompt_len=12)
    assert np.abs(got - expected).max() <= 2e-4
    # Guard: the rounding is visible, so matching the fake-quantized model means something.
    assert np.abs(got - reference_logits(phi2_checkpoint(name), ids)).max() > 1e-2


@pytest.mark.parametrize("precision", ["fp16", "int4"])
def test_cuda_variants_built_and_checked_on_cpu(precision, phi2_checkpoint, phi2_export):
    """fp16 activations and KV cache; every op used has a CPU fp16 kernel, so CPU ORT runs it."""
    folder = phi2_export("phi2", precision, device="cuda")
    assert_cuda_io(folder)
    ids = random_ids(16, seed=9)
    expected = reference_logits(phi2_checkpoint("phi2"), ids)
    got = OnnxLM(folder)(ids)
    tolerance = 2e-2 if precision == "fp16" else 1.0  # fp16 rounding; int4 only needs to be sane
    assert np.abs(got - expected).max() <= tolerance
    if precision == "fp16":
        assert (got.argmax(-1) == expected.argmax(-1)).mean() >= 0.9


def test_hub_phi2_config_values():
    """microsoft/phi-2's config.json (transformers-4 keys): rotary 32 of head 80, LayerNorm eps."""
    from phi_onnx.source.config import parse_config

    cfg = parse_config({"architectures": ["PhiForCausalLM"], "model_type": "phi", "hidden_act": "gelu_new",
                        "hidden_size": 2560, "intermediate_size": 10240, "layer_norm_eps": 1e-5,
                        "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
                        "partial_rotary_factor": 0.4, "qk_layernorm": False, "rope_scaling": None,
                        "rope_theta": 10000.0, "vocab_size": 51200, "max_position_embeddings": 2048})
    assert (cfg.head_dim, cfg.rope.rotary_dim, cfg.rope.kind) == (80, 32, "default")
    assert cfg.norm_eps == 1e-5 and cfg.num_experts == 0
