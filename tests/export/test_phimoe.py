"""Phi-3.5-MoE (`PhimoeForCausalLM`): sparse mixer, fp32 parity, LongRoPE, genai, int4, graph, CUDA variants."""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
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

from phi_onnx.export import ExportOptions, export
from phi_onnx.quantize import dequantize_int4, quantize_int4
from phi_onnx.source.config import parse_config

TOL = 1e-4

#: Tiny PhimoeConfig overrides. No linear width equals the vocab size (1040); the experts' widths
#: (128) divide the int4 block sizes QMoE is tested with.
MOE_CHECKPOINTS: dict[str, dict[str, Any]] = {
    # Phi-3.5-MoE in small: GQA 4:2, q/k/v/o and LM head biases, LongRoPE with an original context
    # of 64 so tests cross it, and short/long mscale that differ (the hub's are equal) so a wrong
    # switch would show.
    "moe": {
        "num_key_value_heads": 2, "attention_bias": True, "lm_head_bias": True, "max_position_embeddings": 512,
        "rope_parameters": {
            "rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 64,
            "short_factor": [1.0 + 0.02 * i for i in range(16)], "long_factor": [1.0 + 0.5 * i for i in range(16)],
            "short_mscale": 1.1, "long_mscale": 1.3},
    },
    # Default rotary, MHA, no biases, 6 experts, intermediate 96, a larger jitter eps (more experts
    # within the mixer's threshold).
    "moe-plain": {"num_local_experts": 6, "intermediate_size": 96, "router_jitter_noise": 0.2},
    # Wide experts, so that one layer's stacked fc1 (8 x 8192 x 128 fp32 = 33.6 MB) dwarfs every other
    # tensor: the memory test tells streamed experts from stacked ones.
    "moe-wide": {"num_hidden_layers": 1, "num_local_experts": 8, "intermediate_size": 4096},
}

BASE_CONFIG: dict[str, Any] = {
    "vocab_size": 1040, "hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 4, "intermediate_size": 128, "num_local_experts": 4, "num_experts_per_tok": 2,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 3,
    "pad_token_id": 3,
}


@pytest.fixture(scope="session")
def moe_checkpoint(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Callable[[str], Path]:
    """`moe_checkpoint(name)` → folder of a saved random Phi-3.5-MoE (cached per name)."""
    cache: dict[str, Path] = {}

    def make(name: str) -> Path:
        if name not in cache:
            from transformers import PhimoeConfig, PhimoeForCausalLM

            torch.manual_seed(sum(map(ord, name)))
            model = PhimoeForCausalLM(PhimoeConfig(**{**BASE_CONFIG, **MOE_CHECKPOINTS[name]})).eval()
            # save_pretrained writes the hub layout: block_sparse_moe.experts.N.w1/w2/w3
            cache[name] = save_tiny_checkpoint(model, tmp_path_factory.mktemp(name), tokenizer_dir)
        return cache[name]

    return make


@pytest.fixture(scope="session")
def moe_export(tmp_path_factory: pytest.TempPathFactory,
               moe_checkpoint: Callable[[str], Path]) -> Callable[..., Path]:
    """`moe_export(name, precision="fp32", **options)` → exported folder (cached)."""
    return cached_exports(tmp_path_factory, moe_checkpoint)


def switch_longrope_factors(model):
    """Make transformers' Phimoe rotary use LongRoPE's long factors past the original context.

    transformers 5.23's PhimoeRotaryEmbedding.forward recomputes inv_freq with
    `rope_init_fn(config)`, without the sequence length, so it always takes short_factor (the long
    inv_freq its @dynamic_rope_update prepares goes unused), while its mscale does switch.
    Microsoft's own modeling_phimoe.py, vLLM and onnxruntime-genai take long_factor past the
    original context, as transformers' Phi-3 does; the export follows them, and so does this
    reference. `test_transformers_phimoe_ignores_long_factor` notices when transformers changes.
    """
    rotary = model.model.rotary_emb
    init = rotary.rope_init_fn
    forward = rotary.forward

    def patched(x, position_ids=None):
        rotary.rope_init_fn = functools.partial(init, seq_len=int(position_ids.max()) + 1)
        return forward(x, position_ids)

    rotary.forward = patched
    return model


def load_reference(folder: Path, *, switch: bool = True):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return switch_longrope_factors(model) if switch else model


def logits_of(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(ids)).logits.numpy()




# -- the sparse mixer --------------------------------------------------------------------------
@pytest.mark.parametrize("jitter", [0.01, 0.2])
def test_sparse_mixer_matches_transformers(jitter, moe_checkpoint):
    """The mixer as ONNX ops against transformers' `sparsemixer` (eval), on logits built to hit its
    corners: near-ties inside and outside the 2*eps threshold, negative and zero maxima, exact ties."""
    from transformers.models.phimoe.modeling_phimoe import sparsemixer

    from phi_onnx.export.phimoe import PhimoeBuilder
    from phi_onnx.source.checkpoint import Checkpoint
    from phi_onnx.source.config import load_config

    folder = moe_checkpoint("moe")
    cfg = load_config(folder)
    cfg = dataclasses.replace(cfg, router_jitter_noise=jitter)
    builder = PhimoeBuilder(cfg, Checkpoint(folder), ExportOptions(precision="fp32"))
    g = builder.g
    scores_in = g.input("scores", ir.DataType.FLOAT, ["tokens", 4])
    g.output(builder.sparse_mixer(scores_in), "weights", ir.DataType.FLOAT, ["tokens", 4])
    proto = ir.serde.serialize_model(g.model(producer_version="test"))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])

    rng = np.random.default_rng(0)
    scores = [rng.standard_normal((200, 4)), rng.standard_normal((200, 4)) * 0.01,
              1.0 + rng.standard_normal((200, 4)) * jitter, -1.0 - np.abs(rng.standard_normal((200, 4))) * jitter,
              np.array([[0.0, 0.0, -1.0, -2.0], [1.0, 1.0, 1.0, 1.0], [0.0, -0.5, 0.5, 0.5], [2.0, 1.0, 1.0, -3.0]])]
    scores = np.concatenate(scores).astype(np.float32)
    got = session.run(None, {"scores": scores})[0]
    multiplier, selected = sparsemixer(torch.from_numpy(scores), jitter_eps=jitter, training=False)
    expected = np.zeros_like(scores)
    np.put_along_axis(expected, selected.numpy(), multiplier.numpy(), axis=1)
    assert np.array_equal(got > 0, expected > 0)  # the same two experts everywhere
    assert np.abs(got - expected).max() <= 1e-6


# -- fp32 parity ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["moe", "moe-plain"])
def test_prompt_and_decode_match_transformers(name, moe_checkpoint, moe_export):
    ids = random_ids(24, seed=1)
    expected = logits_of(load_reference(moe_checkpoint(name)), ids)
    got = prompt_then_decode(moe_export(name), ids, prompt_len=12)  # 12 decode steps use the cache
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= TOL


@pytest.mark.parametrize("length", [64, 65, 100])
def test_longrope_both_sides_of_the_original_context(length, moe_checkpoint, moe_export):
    """Up to 64 tokens: short factors and short_mscale; beyond: long factors and long_mscale."""
    ids = random_ids(length, seed=length)
    expected = logits_of(load_reference(moe_checkpoint("moe")), ids)
    got = OnnxLM(moe_export("moe"))(ids)
    assert np.abs(got - expected).max() <= TOL


def test_longrope_decode_after_the_switch(moe_checkpoint, moe_export):
    ids = random_ids(80, seed=3)
    expected = logits_of(load_reference(moe_checkpoint("moe")), ids)
    got = prompt_then_decode(moe_export("moe"), ids, prompt_len=70)
    assert np.abs(got - expected).max() <= TOL


def test_transformers_phimoe_ignores_long_factor(moe_checkpoint):
    """Documents why the reference is patched: unpatched transformers agrees within the original
    context and differs past it. If this fails, transformers changed: drop `switch_longrope_factors`."""
    folder = moe_checkpoint("moe")
    patched, plain = load_reference(folder), load_reference(folder, switch=False)
    short_ids, long_ids = random_ids(60, seed=4), random_ids(100, seed=4)
    assert np.abs(logits_of(patched, short_ids) - logits_of(plain, short_ids)).max() == 0
    assert np.abs(logits_of(patched, long_ids) - logits_of(plain, long_ids)).max() > 1e-2


def test_hub_spelling_and_mscale(moe_checkpoint, tmp_path):
    """The hub's config (transformers-4 keys, `PhiMoEForCausalLM`) exports to the same model, and
    its cos/sin factor is the mscale, not the LongRoPE formula's."""
    ckpt = tmp_path / "hub"
    shutil.copytree(moe_checkpoint("moe"), ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config["architectures"] = ["PhiMoEForCausalLM"]
    config["rope_theta"] = rope.pop("rope_theta")
    config["original_max_position_embeddings"] = rope["original_max_position_embeddings"]
    rope["type"] = rope.pop("rope_type")
    config["rope_scaling"] = rope
    (ckpt / "config.json").write_text(json.dumps(config))
    parsed = parse_config(config)
    assert parsed.rope.attention_factor == pytest.approx(1.1)
    assert parsed.rope.long_attention_factor == pytest.approx(1.3)
    export(ckpt, tmp_path / "out", ExportOptions(precision="fp32"))
    ids = random_ids(70, seed=6)
    expected = logits_of(load_reference(moe_checkpoint("moe")), ids)
    assert np.abs(OnnxLM(tmp_path / "out")(ids) - expected).max() <= TOL


def test_hub_phi35_moe_config_values():
    """Phi-3.5-MoE-instruct's rope_scaling: mscale 1.2432 on both sides (the formula would give 1.1902)."""
    config = {"architectures": ["PhiMoEForCausalLM"], "model_type": "phimoe", "hidden_size": 4096,
              "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 32, "vocab_size": 32064,
              "intermediate_size": 6400, "num_local_experts": 16, "num_experts_per_tok": 2,
              "router_jitter_noise": 0.01, "max_position_embeddings": 131072,
              "original_max_position_embeddings": 4096, "rope_theta": 10000.0,
              "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 64, "long_factor": [1.5] * 64,
                               "short_mscale": 1.243163121016122, "long_mscale": 1.243163121016122,
                               "original_max_position_embeddings": 4096}}
    cfg = parse_config(config)
    assert cfg.rope.attention_factor == pytest.approx(1.243163121016122)
    assert cfg.rope.long_attention_factor == pytest.approx(1.243163121016122)
    assert (cfg.num_experts, cfg.experts_per_token, cfg.router_jitter_noise) == (16, 2, 0.01)


# -- graph -------------------------------------------------------------------------------------
@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_graph_ops(precision, moe_export, tmp_path):
    counts = op_counts(moe_export("moe", precision))
    assert counts["GroupQueryAttention"] == 2 and counts["LayerNormalization"] == 5
    assert counts["SkipLayerNormalization"] == 0 and counts["Sum"] == 4
    if precision == "fp32":
        assert counts["MoE"] == 2 and counts["MatMul"] == 2 * 3 + 1  # qkv, o, router per layer + LM head
    else:
        assert counts["QMoE"] == 2 and counts["MatMulNBits"] == 2 * 2 + 1
        assert counts["MatMul"] == 2  # the router stays fp32: routing is discrete
    # ORT's optimizer leaves the LayerNorms unfused (see layers.layer_norm / residual_sum).
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(moe_export("moe", precision) / "model.onnx"), options,
                         providers=["CPUExecutionProvider"])
    optimized = Counter(n.op_type for n in onnx.load(tmp_path / "optimized.onnx", load_external_data=False).graph.node)
    assert optimized["SkipLayerNormalization"] == 0 and optimized["LayerNormalization"] == 5


def test_fp32_experts_are_written_one_at_a_time(moe_checkpoint, tmp_path):
    """Saving never stacks a layer's experts in memory (a real Phi-3.5-MoE fc1 is 3.4 GB in fp32).

    Measured: 15 MB traced peak streamed, 84 MB when the stacked array is written."""
    import tracemalloc

    checkpoint = moe_checkpoint("moe-wide")
    stacked_fc1 = 8 * 2 * 4096 * 128 * 4
    tracemalloc.start()
    try:
        export(str(checkpoint), tmp_path / "out", ExportOptions(precision="fp32"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < stacked_fc1, f"peak {peak / 1e6:.1f} MB while writing a {stacked_fc1 / 1e6:.1f} MB fc1"
    # The streamed bytes are the stacked layout: the export still equals transformers.
    ids = random_ids(20, seed=8)
    expected = logits_of(load_reference(checkpoint), ids)
    assert np.abs(OnnxLM(tmp_path / "out")(ids) - expected).max() <= TOL


def test_genai_config(moe_export):
    cfg = json.loads((moe_export("moe") / "genai_config.json").read_text())
    assert cfg["model"]["type"] == "phimoe"
    assert cfg["model"]["decoder"]["num_key_value_heads"] == 2


@pytest.mark.parametrize("name", ["moe", "moe-plain"])
def test_genai_greedy_equals_transformers(name, moe_checkpoint, moe_export):
    pytest.importorskip("onnxruntime_genai")
    prompt, new_tokens = random_ids(16, seed=7), 32  # 48 tokens stay inside the original context (64)
    expected = transformers_greedy(load_reference(moe_checkpoint(name)), prompt, new_tokens)
    assert genai_greedy(moe_export(name), prompt, new_tokens) == expected


# -- int4 ----------------------------------------------------------------------------------------
def fake_quantized(model, block_size: int, symmetric: bool):
    """The reference with q/k/v/o, the LM head, the embedding and every expert's weights through the int4
    round trip.

    The router is left in fp32, as the export leaves it.
    """
    def round_trip(w: np.ndarray) -> np.ndarray:
        return dequantize_int4(quantize_int4(w, block_size, symmetric))

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not name.endswith("router"):
            module.weight = torch.nn.Parameter(torch.from_numpy(round_trip(module.weight.detach().numpy())))
        if name.endswith("experts"):
            for param in ("gate_up_proj", "down_proj"):
                w = getattr(module, param).detach().numpy()
                setattr(module, param, torch.nn.Parameter(torch.from_numpy(np.stack([round_trip(e) for e in w]))))
    embedding = model.get_input_embeddings()  # int4 exports quantize the embedding table the same way
    table = dequantize_int4(quantize_int4(embedding.weight.detach().numpy(), block_size, symmetric))
    embedding.weight = torch.nn.Parameter(torch.from_numpy(table))
    return model


@pytest.mark.parametrize(("name", "block_size", "symmetric"), [("moe", 32, True), ("moe", 16, False)])
def test_int4_matches_quantization_aware_reference(name, block_size, symmetric, moe_checkpoint, moe_export):
    reference = fake_quantized(load_reference(moe_checkpoint(name)), block_size, symmetric)
    ids = random_ids(20, seed=11)
    expected = logits_of(reference, ids)
    # accuracy level 1 keeps activations in fp32 (QMoE too), so only the weight rounding differs.
    folder = moe_export(name, "int4", block_size=block_size, symmetric=symmetric, accuracy_level=1,
                        embeddings="int4", lm_head_bits=4)  # the tables as the reference rounds them
    got = prompt_then_decode(folder, ids, prompt_len=12)
    assert np.abs(got - expected).max() <= 2e-4
    # Guard: the rounding is visible, so matching the fake-quantized model means something.
    assert np.abs(got - logits_of(load_reference(moe_checkpoint(name)), ids)).max() > 1e-2


def test_int4_block_size_must_divide_the_expert_widths(moe_checkpoint, tmp_path):
    from phi_onnx.errors import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="QMoE"):
        export(moe_checkpoint("moe-plain"), tmp_path / "out", ExportOptions(precision="int4", block_size=64))


# -- CUDA variants -------------------------------------------------------------------------------
@pytest.mark.parametrize("precision", ["fp16", "int4"])
def test_cuda_variants_built_and_checked_on_cpu(precision, moe_checkpoint, moe_export):
    """fp16 activations, KV cache and experts; ORT has CPU fp16 kernels for MoE and QMoE, so CPU runs it."""
    folder = moe_export("moe", precision, device="cuda")
    assert_cuda_io(folder)
    ids = random_ids(16, seed=9)
    expected = logits_of(load_reference(moe_checkpoint("moe")), ids)
    got = OnnxLM(folder)(ids)
    tolerance = 2e-2 if precision == "fp16" else 1.0  # fp16 rounding; int4 only needs to be sane
    assert np.abs(got - expected).max() <= tolerance
    if precision == "fp16":
        assert (got.argmax(-1) == expected.argmax(-1)).mean() >= 0.9
