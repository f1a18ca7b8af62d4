"""Phi-3-small exports match a PyTorch reference written from the architecture facts.

transformers has no Phi-3-small and the hub's remote code is never run, so each tiny checkpoint is
random weights saved as safetensors with a config.json in the hub's spelling, and the reference is
tests/export/phi3small_reference.py. Block size 4 or 8 makes the prompts span many sparse blocks.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from helpers import OnnxLM, prompt_then_decode, random_ids
from phi3small_reference import block_sparse_mask, forward, random_weights

from phi_onnx.export import ExportOptions, export
from phi_onnx.export.phi3small import Phi3SmallBuilder
from phi_onnx.export.registry import builder_for
from phi_onnx.export.tiktoken_bpe import CL100K_PATTERN, tiktoken_tokenizer_json
from phi_onnx.quantize import dequantize_int4, quantize_int4
from phi_onnx.source.config import parse_config
from phi_onnx.source.phi3small import DUMMY_TOKEN_IDS, model_config, read_settings

TOL = 1e-4

BASE: dict[str, Any] = {
    "architectures": ["Phi3SmallForCausalLM"], "model_type": "phi3small", "vocab_size": 1040, "hidden_size": 128,
    "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "ff_intermediate_size": 160,
    "ff_dim_multiplier": None, "hidden_act": "gegelu", "gegelu_limit": 1.5, "layer_norm_epsilon": 1e-5,
    "max_position_embeddings": 512, "rope_embedding_base": 10000, "rope_position_scale": 1.0,
    "blocksparse_block_size": 4, "blocksparse_num_local_blocks": 2, "blocksparse_vert_stride": 3,
    "blocksparse_homo_head_pattern": False, "blocksparse_triton_kernel_block_size": 4,
    "dense_attention_every_n_layers": 2, "mup_use_scaling": True, "mup_attn_multiplier": 1.0,
    "mup_embedding_multiplier": 10.0, "mup_width_multiplier": 8.0, "bos_token_id": 1, "eos_token_id": 3,
    "dummy_token_indices": [5, 100, 1039],
}

CONFIGS: dict[str, dict[str, Any]] = {
    # GQA 4:2, per-head stripes (step 1), dense layers 1 and 3, a gegelu limit the activations cross.
    "gqa": {},
    # MHA, one pattern for all heads, 8-token blocks, one local block, dense every 3rd layer.
    "mha-homo": {"num_key_value_heads": 4, "num_hidden_layers": 3, "blocksparse_homo_head_pattern": True,
                 "blocksparse_block_size": 8, "blocksparse_num_local_blocks": 1, "blocksparse_vert_stride": 2,
                 "dense_attention_every_n_layers": 3},
    # MQA 2:1 with vert_stride 4 > heads: the stripes move by int(4 / 2) = 2 blocks per head.
    "mqa-step2": {"hidden_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1, "ff_intermediate_size": 96,
                  "blocksparse_vert_stride": 4},
    # head_dim 24 (cos/sin width 12: rotary as ops, GroupQueryAttention cannot fuse it), GQA 4:1, no muP
    # attention scale, rope_position_scale 0.5, MLP width from ff_dim_multiplier (2 * 32 * 2 = 128 -> 256).
    "rot24": {"hidden_size": 96, "num_attention_heads": 4, "num_key_value_heads": 1, "ff_intermediate_size": None,
              "ff_dim_multiplier": 2, "gegelu_pad_to_256": True, "mup_use_scaling": False,
              "rope_position_scale": 0.5, "num_hidden_layers": 2},
    # Attention output biases offset by 1000: every LayerNorm input after the first sits far from zero
    # mean (SkipLayerNormalization's one-pass CPU variance misses by 2.3e-4 here; LayerNormalization passes).
    "offset": {"num_hidden_layers": 2, "dense_bias_offset_for_tests": 1000.0},
    # Phi-3-small-128k's LongRoPE ("su") with both mscales, every layer block-sparse (no dense layers).
    "longrope": {"num_hidden_layers": 2, "dense_attention_every_n_layers": None, "max_position_embeddings": 256,
                 "rope_scaling": {"type": "su", "short_factor": [1.0 + 0.05 * i for i in range(16)],
                                  "long_factor": [1.0 + 0.6 * i for i in range(16)],
                                  "original_max_position_embeddings": 32, "short_mscale": 1.1,
                                  "long_mscale": 1.3}},
    # LongRoPE without mscales: short 1.0, long sqrt(1 + ln(256 / 32) / ln(32)) (the hub's defaults).
    "longrope-default": {"num_hidden_layers": 2, "max_position_embeddings": 256,
                         "rope_scaling": {"type": "longrope", "short_factor": [1.0 + 0.05 * i for i in range(16)],
                                          "long_factor": [1.0 + 0.6 * i for i in range(16)],
                                          "original_max_position_embeddings": 32}},
}


def make_config(name: str, **overrides: Any) -> dict[str, Any]:
    cfg = {**BASE, **CONFIGS[name], **overrides}
    if cfg["ff_intermediate_size"] is None:
        size = cfg["ff_dim_multiplier"] * (cfg["hidden_size"] // 3) * 2
        cfg["ff_intermediate_size_for_tests"] = -(-size // 256) * 256 if cfg.get("gegelu_pad_to_256") else size
    return cfg


def weights_for(cfg: dict[str, Any], seed: int) -> dict[str, torch.Tensor]:
    inter = cfg.get("ff_intermediate_size") or cfg["ff_intermediate_size_for_tests"]
    weights = random_weights({**cfg, "ff_intermediate_size": inter}, seed)
    for name, tensor in weights.items():
        if name.endswith("self_attn.dense.bias"):
            tensor += cfg.get("dense_bias_offset_for_tests", 0.0)
    return weights


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory):
    """`checkpoint(name, **overrides)` → (folder, config, weights); the weights depend on the name only."""
    cache: dict[tuple[Any, ...], tuple[Path, dict[str, Any], dict[str, torch.Tensor]]] = {}

    def make(name: str, **overrides: Any):
        key = (name, json.dumps(overrides, sort_keys=True))
        if key not in cache:
            from safetensors.torch import save_file

            cfg = make_config(name, **overrides)
            weights = weights_for(cfg, seed=sum(map(ord, name)))
            folder = tmp_path_factory.mktemp(f"phi3small-{name}")
            save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / "model.safetensors"))
            (folder / "config.json").write_text(json.dumps({k: v for k, v in cfg.items()
                                                            if not k.endswith("_for_tests")}))
            cache[key] = (folder, cfg, weights)
        return cache[key]

    return make


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, checkpoint):
    """`exported(name, precision="fp32", overrides={}, **options)` → export folder (cached)."""
    cache: dict[tuple[Any, ...], Path] = {}

    def make(name: str, precision: str = "fp32", overrides: dict[str, Any] | None = None, **options: Any) -> Path:
        overrides = overrides or {}
        key = (name, precision, json.dumps(overrides, sort_keys=True), tuple(sorted(options.items())))
        if key not in cache:
            folder = checkpoint(name, **overrides)[0]
            out = tmp_path_factory.mktemp("phi3small-export") / f"{name}-{precision}"
            export(folder, out, ExportOptions(precision=precision, **options))  # type: ignore[arg-type]
            cache[key] = out
        return cache[key]

    return make



def real(cfg: dict[str, Any]) -> np.ndarray:
    """The vocabulary ids whose logits are not masked."""
    return ~np.isin(np.arange(cfg["vocab_size"]), cfg.get("dummy_token_indices") or [])


# -- parity ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["gqa", "mha-homo", "mqa-step2", "rot24", "offset"])
def test_prompt_and_decode_match_reference(name, checkpoint, exported):
    """40 tokens (10 blocks of 4, 5 of 8): a 28-token prompt, then 12 decode steps through the cache."""
    _, cfg, weights = checkpoint(name)
    ids = random_ids(40, seed=1)
    expected = forward(cfg, weights, ids)
    got = prompt_then_decode(exported(name), ids, prompt_len=28)
    assert got.shape == expected.shape
    keep = real(cfg)
    assert np.abs(got - expected)[..., keep].max() <= TOL
    assert np.abs(expected[..., keep]).max() > 1.0  # logits are not all near zero


@pytest.mark.parametrize("name", ["gqa", "rot24"])
def test_right_padded_batch(name, checkpoint, exported):
    """Two rows of 40 and 27 tokens in one prompt, then one decode step each: the sparse pattern and
    (for rot24, rotary as ops) the rotary positions follow each row."""
    import onnxruntime as ort

    _, cfg, weights = checkpoint(name)
    folder = exported(name)
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    lengths, width = (40, 27), 40
    rows = [random_ids(n + 1, seed=20 + n)[0] for n in lengths]
    ids = np.full((2, width), 3, dtype=np.int64)
    mask = np.zeros((2, width), dtype=np.int64)
    for b, n in enumerate(lengths):
        ids[b, :n], mask[b, :n] = rows[b][:n], 1
    empty = np.zeros((2, cfg["num_key_value_heads"], 0, cfg["hidden_size"] // cfg["num_attention_heads"]), np.float32)
    pasts = {i.name: empty for i in session.get_inputs() if i.name.startswith("past")}
    names = [o.name for o in session.get_outputs()]
    out = dict(zip(names, session.run(None, {"input_ids": ids, "attention_mask": mask, **pasts}), strict=True))
    keep = real(cfg)
    for b, n in enumerate(lengths):
        expected = forward(cfg, weights, rows[b][None, :n])
        assert np.abs(out["logits"][b, :n] - expected[0])[..., keep].max() <= TOL
    step_ids = np.array([[rows[0][40]], [rows[1][27]]], dtype=np.int64)
    step_mask = np.zeros((2, width + 1), dtype=np.int64)
    step_mask[0, :41], step_mask[1, :28] = 1, 1
    pasts = {name.replace("present", "past_key_values"): value for name, value in out.items() if name != "logits"}
    step = session.run(["logits"], {"input_ids": step_ids, "attention_mask": step_mask, **pasts})[0]
    for b, n in enumerate(lengths):
        expected = forward(cfg, weights, rows[b][None, :n + 1])[0, -1]
        assert np.abs(step[b, 0] - expected)[keep].max() <= TOL


@pytest.mark.parametrize("name", ["longrope", "longrope-default"])
@pytest.mark.parametrize("length", [32, 33, 70])
def test_longrope_both_sides_of_the_original_context(name, length, checkpoint, exported):
    """Up to 32 tokens: short factors and short_mscale; beyond: long factors and long_mscale."""
    _, cfg, weights = checkpoint(name)
    ids = random_ids(length, seed=length)
    expected = forward(cfg, weights, ids)
    got = OnnxLM(exported(name))(ids)
    assert np.abs(got - expected)[..., real(cfg)].max() <= TOL


def test_longrope_decode_after_the_switch(checkpoint, exported):
    _, cfg, weights = checkpoint("longrope")
    ids = random_ids(50, seed=3)
    expected = forward(cfg, weights, ids)
    got = prompt_then_decode(exported("longrope"), ids, prompt_len=40)
    assert np.abs(got - expected)[..., real(cfg)].max() <= TOL


def test_longrope_mscales_matter(checkpoint):
    """Guards the tests above: the short and long mscale rules change the logits."""
    _, cfg, weights = checkpoint("longrope")
    ids = random_ids(40, seed=4)
    base = forward(cfg, weights, ids)
    plain = {**cfg, "rope_scaling": {**cfg["rope_scaling"], "short_mscale": 1.0, "long_mscale": 1.0}}
    assert np.abs(forward(plain, weights, ids) - base)[..., real(cfg)].max() > 1e-2
    short = forward(cfg, weights, ids[:, :30])
    assert np.abs(forward(plain, weights, ids[:, :30]) - short)[..., real(cfg)].max() > 1e-2


# -- the sparse layers are sparse --------------------------------------------------------------------
@pytest.mark.parametrize("change", [
    {"dense_attention_every_n_layers": 1},  # every layer dense
    {"blocksparse_homo_head_pattern": True},  # every head on head 0's stripes
    {"blocksparse_vert_stride": 4},  # other stripes
    {"blocksparse_num_local_blocks": 3},  # a wider local window
])
def test_changing_the_pattern_changes_the_logits(change, checkpoint, exported):
    """The same weights under another pattern: the export follows it, and the logits move."""
    _, cfg, weights = checkpoint("gqa")
    ids = random_ids(40, seed=2)
    sparse = OnnxLM(exported("gqa"))(ids)
    _, changed_cfg, changed_weights = checkpoint("gqa", **change)
    assert all(torch.equal(weights[k], changed_weights[k]) for k in weights)
    changed = OnnxLM(exported("gqa", overrides=change))(ids)
    keep = real(cfg)
    assert np.abs(changed - forward(changed_cfg, weights, ids))[..., keep].max() <= TOL
    assert np.abs(changed - sparse)[..., keep].max() > 1e-2


def test_reference_mask_is_the_published_pattern():
    """Spot checks of the reference mask against the rule written out by hand."""
    mask = block_sparse_mask(heads=4, length=40, block=4, local=2, stride=3, homo=False)
    for h in range(4):
        for q in range(40):
            for k in range(40):
                bq, bk = q // 4, k // 4
                allowed = k <= q and (bq - bk < 2 or (bk + h + 1) % 3 == 0)
                assert bool(mask[h, q, k]) == allowed
    two_heads = block_sparse_mask(heads=2, length=64, block=4, local=2, stride=4, homo=False)
    assert bool(two_heads[1, 63, 4]) and not bool(two_heads[0, 63, 4])  # block 1: (1 + 1*2 + 1) % 4 == 0


# -- numbers the graph must carry ---------------------------------------------------------------------
def test_dummy_tokens_get_the_fp32_minimum(checkpoint, exported):
    _, cfg, _ = checkpoint("gqa")
    got = OnnxLM(exported("gqa"))(random_ids(8, seed=9))
    assert np.all(got[..., cfg["dummy_token_indices"]] == np.finfo(np.float32).min)
    assert np.all(got[..., real(cfg)] > -1e3)


def test_fused_graph(exported):
    """One GroupQueryAttention per layer (sparse ones with the bias input), no Softmax; LayerNorm after a
    Sum (not SkipLayerNormalization, whose CPU kernel computes the variance in one pass)."""
    model = onnx.load(exported("gqa") / "model.onnx", load_external_data=False)
    counts = Counter(n.op_type for n in model.graph.node)
    assert counts["GroupQueryAttention"] == 4
    assert counts["LayerNormalization"] == 2 * 4 + 1 and counts["Sum"] == 2 * 4
    assert counts["SkipLayerNormalization"] == 0
    assert counts["QuickGelu"] == 4 and counts["MatMul"] == 4 * 4 + 1
    assert counts["Softmax"] == 0 and counts["SparseAttention"] == 0
    gqa = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    with_bias = [len(n.input) > 10 and n.input[10] != "" for n in gqa]
    assert with_bias == [True, False, True, False]  # layers 0, 2 sparse; 1, 3 dense
    scale = next(a.f for a in gqa[0].attribute if a.name == "scale")
    assert scale == pytest.approx(1 / 32)  # muP: mup_attn_multiplier / head_dim


# -- int4 ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "block_size", "symmetric"), [("gqa", 32, True), ("mqa-step2", 16, False)])
def test_int4_matches_quantization_aware_reference(name, block_size, symmetric, checkpoint, exported):
    """Every projection and the tied embedding / LM head table replaced by its int4 round trip."""
    _, cfg, weights = checkpoint(name)

    def round_trip(w: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(dequantize_int4(quantize_int4(w.numpy(), block_size, symmetric)))

    rounded = ("query_key_value.weight", "dense.weight", "proj.weight", "embed_tokens.weight")
    quantized = {k: round_trip(v) if k.endswith(rounded) else v for k, v in weights.items()}
    ids = random_ids(24, seed=11)
    expected = forward(cfg, quantized, ids, lm_head=round_trip(weights["model.embed_tokens.weight"]))
    folder = exported(name, "int4", block_size=block_size, symmetric=symmetric, accuracy_level=1,
                      embeddings="int4", lm_head_bits=4)  # the tables as the reference rounds them
    got = prompt_then_decode(folder, ids, prompt_len=14)
    keep = real(cfg)
    assert np.abs(got - expected)[..., keep].max() <= 2e-4
    assert np.abs(got - forward(cfg, weights, ids))[..., keep].max() > 1e-2  # int4 rounding is visible


# -- onnxruntime-genai ----------------------------------------------------------------------------------
def test_genai_runs_the_export_with_its_shared_kv_buffer(checkpoint, exported):
    """onnxruntime-genai (model type phi3small, past/present sharing one max-length buffer) gives the
    reference's logits at every greedy step."""
    og = pytest.importorskip("onnxruntime_genai")
    _, cfg, weights = checkpoint("gqa")
    folder = exported("gqa")
    assert json.loads((folder / "genai_config.json").read_text())["model"]["type"] == "phi3small"
    prompt = random_ids(14, seed=7)
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=30)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    ids = prompt
    while not generator.is_done():
        logits = np.asarray(generator.get_logits()).reshape(-1)
        expected = forward(cfg, weights, ids)[0, -1]
        assert np.abs(logits - expected)[real(cfg)].max() <= TOL
        generator.generate_next_token()
        ids = np.concatenate([ids, [[int(generator.get_next_tokens()[0])]]], axis=1)
    assert ids.shape[1] == 30


# -- config facts ---------------------------------------------------------------------------------------
HUB_8K_CONFIG: dict[str, Any] = {  # microsoft/Phi-3-small-8k-instruct config.json (architecture keys)
    "architectures": ["Phi3SmallForCausalLM"], "blocksparse_block_size": 64, "blocksparse_homo_head_pattern": False,
    "blocksparse_num_local_blocks": 16, "blocksparse_triton_kernel_block_size": 64, "blocksparse_vert_stride": 8,
    "bos_token_id": 100257, "dense_attention_every_n_layers": 2, "eos_token_id": 100257, "ff_dim_multiplier": None,
    "ff_intermediate_size": 14336, "gegelu_limit": 20.0, "gegelu_pad_to_256": True, "hidden_act": "gegelu",
    "hidden_size": 4096, "layer_norm_epsilon": 1e-05, "max_position_embeddings": 8192, "model_type": "phi3small",
    "mup_attn_multiplier": 1.0, "mup_embedding_multiplier": 10.0, "mup_use_scaling": True,
    "mup_width_multiplier": 8.0, "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "rope_embedding_base": 1000000, "rope_position_scale": 1.0, "torch_dtype": "bfloat16", "vocab_size": 100352,
}


def test_hub_8k_config_reads_as_published():
    cfg = parse_config(HUB_8K_CONFIG)
    settings, model = read_settings(cfg), model_config(cfg)
    assert builder_for("Phi3SmallForCausalLM") is Phi3SmallBuilder
    assert settings.attn_scale == 1 / 128
    assert [i for i in range(32) if settings.is_dense(i)] == list(range(1, 32, 2))
    assert settings.head_step(32) == 1 and settings.embedding_multiplier == 10.0 and settings.width_multiplier == 8.0
    assert settings.dummy_token_ids == DUMMY_TOKEN_IDS and len(DUMMY_TOKEN_IDS) == 91
    assert model.rope.theta == 1e6 and model.rope.rotary_dim == 128 and model.rope.kind == "default"
    assert model.intermediate_size == 14336 and model.norm_eps == 1e-5 and model.tie_word_embeddings
    long = parse_config({**HUB_8K_CONFIG, "max_position_embeddings": 131072, "rope_scaling": {
        "type": "su", "short_factor": [1.0] * 64, "long_factor": [2.0] * 64, "original_max_position_embeddings": 8192}})
    rope = model_config(long).rope  # the hub's short/long mscale are the rope's two attention factors
    assert rope.attention_factor == 1.0
    assert rope.long_attention_factor == pytest.approx(math.sqrt(1 + math.log(16) / math.log(8192)))
    assert rope.original_max_position_embeddings == 8192


# -- tokenizer --------------------------------------------------------------------------------------------
def _train_tiktoken(corpus: str, merges: int) -> dict[bytes, int]:
    """A tiktoken-style rank table: the 256 bytes, then the most frequent adjacent pair, repeatedly."""
    import regex

    ranks = {bytes([b]): b for b in range(256)}
    words = [[bytes([b]) for b in piece.encode()] for piece in regex.findall(CL100K_PATTERN, corpus)]
    for _ in range(merges):
        pairs: Counter = Counter()
        for word in words:
            pairs.update(itertools.pairwise(word))
        if not pairs:
            break
        (a, b), _ = pairs.most_common(1)[0]
        ranks[a + b] = len(ranks)
        for word in words:
            i = 0
            while i < len(word) - 1:
                if word[i] == a and word[i + 1] == b:
                    word[i:i + 2] = [a + b]
                i += 1
    return ranks


def _tiktoken_encode(text: str, ranks: dict[bytes, int], specials: dict[str, int]) -> list[int]:
    """tiktoken's algorithm: split specials, regex pieces, a whole-piece lookup, else lowest-rank merges."""
    import regex

    ids: list[int] = []
    for chunk in re.split("(" + "|".join(map(re.escape, specials)) + ")", text):
        if chunk in specials:
            ids.append(specials[chunk])
            continue
        for piece in regex.findall(CL100K_PATTERN, chunk):
            data = piece.encode()
            if data in ranks:
                ids.append(ranks[data])
                continue
            parts = [data[i:i + 1] for i in range(len(data))]
            while True:
                candidates = [(ranks[parts[i] + parts[i + 1]], i) for i in range(len(parts) - 1)
                              if parts[i] + parts[i + 1] in ranks]
                if not candidates:
                    break
                _, i = min(candidates)
                parts[i:i + 2] = [parts[i] + parts[i + 1]]
            ids.extend(ranks[p] for p in parts)
    return ids


CORPUS = ("def forward(self, x):\n    return self.linear(x) + 1234567\n" * 3 +
          "The quick brown fox jumps over the lazy dog. Don't stop; it's 2024!\n\n  indented\tline\n" * 3 +
          "naïve café — 東京 😀 ünïcödé\r\n" * 2)
TEXTS = [CORPUS, "<|user|>\nHello world<|end|>\n<|assistant|>\n", "   leading spaces and trailing   ",
         "x=1_000_000;y='it''s'", "new\n\n\nlines\r\n\twith tabs", "unseen: ßüñ Ω 🤖 and 123456789", "<|endoftext|>"]


def test_tiktoken_conversion_tokenizes_like_tiktoken():
    """A tiktoken-style rank table converted to tokenizer.json encodes and decodes as tiktoken does."""
    from tokenizers import Tokenizer

    ranks = _train_tiktoken(CORPUS, 300)
    specials = {"<|endoftext|>": len(ranks), "<|user|>": len(ranks) + 1, "<|assistant|>": len(ranks) + 2,
                "<|end|>": len(ranks) + 3}
    tokenizer = Tokenizer.from_str(json.dumps(tiktoken_tokenizer_json(ranks, specials)))
    for text in TEXTS:
        expected = _tiktoken_encode(text, ranks, specials)
        assert tokenizer.encode(text, add_special_tokens=False).ids == expected, text
        assert tokenizer.decode(expected, skip_special_tokens=False) == text


def test_written_tokenizer_loads_in_genai(tmp_path, checkpoint, exported):
    """write_tokenizer on a folder with a .tiktoken file: onnxruntime-genai encodes as tiktoken does,
    with the Phi-3-small special tokens, and the source's chat template is kept."""
    import base64
    import shutil

    og = pytest.importorskip("onnxruntime_genai")
    from phi_onnx.export.phi3small import SPECIAL_TOKENS, write_tokenizer

    ranks = _train_tiktoken(CORPUS, 300)
    source = tmp_path / "source"
    source.mkdir()
    (source / "cl100k_base.tiktoken").write_text("".join(f"{base64.b64encode(t).decode()} {r}\n"
                                                         for t, r in ranks.items()))
    template = "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n' }}{% endfor %}"
    (source / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Phi3SmallTokenizer", "auto_map": {"AutoTokenizer": ["tokenization_phi3_small.X", None]},
        "chat_template": template, "model_max_length": 8192}))
    folder = tmp_path / "export"
    shutil.copytree(exported("gqa"), folder)
    assert write_tokenizer(source, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["chat_template"] == template and "auto_map" not in config
    tokenizer = og.Tokenizer(og.Model(str(folder)))
    for text in TEXTS:
        assert list(tokenizer.encode(text)) == _tiktoken_encode(text, ranks, SPECIAL_TOKENS), text
    assert not write_tokenizer(folder, tmp_path)  # no .tiktoken there: nothing written
