"""Phi-3-small, 8k and 128k (`Phi3SmallForCausalLM`): block-sparse and dense attention, gegelu, muP.

transformers has no implementation: the hub model is remote code (modeling_phi3_small.py) that needs
flash-attn and Triton on CUDA. Nothing here runs or imports it; the graph is built from the facts
below, each with the public file it was read from. The tests hold a small PyTorch reference written
from the same facts (tests/export/phi3small_reference.py).

FACTS (sources: hub = huggingface.co/microsoft/Phi-3-small-8k-instruct files; vllm =
vllm-project/vllm vllm/model_executor/models/phi3_small.py and vllm/attention/ops/blocksparse_attention/
{utils,interface}.py; mlx = ml-explore/mlx-lm mlx_lm/models/phi3small.py; trtllm = NVIDIA TensorRT-LLM
tensorrt_llm/models/phi3/convert.py; genai = microsoft/onnxruntime-genai builder Phi3SmallModel)

Config keys (hub configuration_phi3_small.py, hub config.json of the 8k model):
  hidden_size 4096, num_hidden_layers 32, num_attention_heads 32, num_key_value_heads 8,
  vocab_size 100352, max_position_embeddings 8192, layer_norm_epsilon 1e-5, hidden_act "gegelu",
  gegelu_limit 20.0, ff_intermediate_size 14336 (else ff_dim_multiplier * (hidden // 3) * 2, rounded
  up to a multiple of 256 when gegelu_pad_to_256), rope_embedding_base 1e6, rope_position_scale 1.0,
  rope_scaling (null for 8k; LongRoPE dict for 128k), blocksparse_block_size 64,
  blocksparse_num_local_blocks 16, blocksparse_vert_stride 8, blocksparse_homo_head_pattern false,
  blocksparse_triton_kernel_block_size 64, dense_attention_every_n_layers 2, mup_use_scaling true,
  mup_attn_multiplier 1.0, mup_embedding_multiplier 10.0, mup_width_multiplier 8.0,
  bos = eos = 100257. No tie_word_embeddings key: PretrainedConfig's default (true) applies.
  head_dim is hidden_size // num_attention_heads (hub, vllm, mlx; a config head_dim is not read).
Tensors (hub modeling_phi3_small.py module names; vllm load_weights; trtllm convert):
  model.embed_tokens.weight; model.layers.N.input_layernorm.{weight,bias};
  model.layers.N.self_attn.query_key_value.{weight,bias} [(heads + 2 kv) * head_dim, hidden];
  model.layers.N.self_attn.dense.{weight,bias}; model.layers.N.post_attention_layernorm.{weight,bias};
  model.layers.N.mlp.up_proj.{weight,bias} [2 * intermediate, hidden]; model.layers.N.mlp.down_proj.{weight,bias};
  model.final_layernorm.{weight,bias}. Every Linear has a bias except lm_head.
  lm_head is tied to embed_tokens (hub `_tied_weights_keys`; vllm copies/ties embed_tokens into lm_head;
  trtllm clones the embedding; mlx uses `embed_tokens.as_linear`).
QKV layout (hub `_split_heads`, vllm forward, mlx, genai make_attention): the output rows form kv_heads
  groups of (heads/kv_heads + 2) * head_dim rows: the group's query heads, then its key head, then its
  value head. Query head h = group * (heads/kv_heads) + i, and it reads key/value head h // (heads/kv_heads)
  (hub `expand_kv_to_q_size` repeat_interleave) -- GroupQueryAttention's grouping. The export permutes the
  rows once into [all Q | all K | all V] (rows only, so int4 blocks along the input are unchanged).
Rotary (hub positional_embedding.py): full head_dim, rotate_half (non-interleaved), inv_freq =
  1 / (base ** (arange(0, d, 2) / d)) in fp32 with base = rope_embedding_base. Without rope_scaling the
  positions are `arange * rope_position_scale` (multiplied; mlx agrees, vllm instead *divides* through
  a "linear" scaling of factor rope_position_scale; see "Not pinned down"). With rope_scaling (type
  "longrope" or "su"; keys short_factor, long_factor,
  original_max_position_embeddings, short_mscale, long_mscale): total length > original uses the long
  factors and cos/sin * long_mscale (if <= 0 or absent: sqrt(1 + ln(s) / ln(original)), s =
  max_position_embeddings / original, 1.0 when s <= 1); otherwise the short factors and cos/sin *
  short_mscale (if <= 0 or absent: 1.0). inv_freq = 1 / (factors * base ** (arange / d)); positions are
  not scaled by rope_position_scale in this mode. (genai defaults a missing short_mscale to the long
  formula instead; the hub is followed.)
Attention scale (hub, vllm, mlx, genai): mup_use_scaling -> mup_attn_multiplier / head_dim, else
  1 / sqrt(head_dim).
Dense vs sparse layers (hub, vllm): layer i (0-based) is dense when dense_attention_every_n_layers is
  set and (i + 1) % n == 0, else block-sparse (n = 2: layers 0, 2, 4, ... sparse). (mlx's
  `i % n == 0 -> sparse` agrees only for n = 2.)
Block-sparse pattern (hub triton_flash_blocksparse_attn.py `_get_sparse_attn_mask`, vllm
  blocksparse_attention/utils.py, genai calculate_block_mask): with block b(p) = p // block_size of
  absolute position p counted from the sequence's first token, query q may attend key k <= q iff
  b(q) - b(k) < num_local_blocks, or (b(k) + h * step + 1) % vert_stride == 0, where h is the *query*
  head (0..heads-1) and step = 0 when blocksparse_homo_head_pattern else max(1, int(vert_stride / heads)).
  Tokens are causal inside the diagonal block. The triton kernel block size only tiles the same pattern.
gegelu MLP (hub `gegelu`, vllm, mlx, genai make_mlp_proj): u = up_proj(x); a = u[..., 0::2] (gelu half,
  even columns), l = u[..., 1::2] (linear half, odd columns); finite a clamped to <= limit, finite l to
  [-limit, limit] (+-inf pass through); out = a * sigmoid(1.702 a) * (l + 1); down_proj(out).
  (vllm calls gegelu without the limit; the hub passes config.gegelu_limit, which is followed.)
Block order (hub decoder layer): x = x + attn(LN_in(x)); x = x + mlp(LN_post(x)); LayerNorm with weight
  and bias (nn.LayerNorm, eps = layer_norm_epsilon); model.final_layernorm after the last layer.
muP (hub Phi3SmallModel / Phi3SmallForCausalLM, vllm, mlx): embeddings * mup_embedding_multiplier (when
  set and > 0); logits = lm_head(x) / mup_width_multiplier (when set; vllm applies it in its sampler).
Dummy tokens (hub tokenization_phi3_small.py `dummy_token_indices`, configuration `dummy_token_indices`,
  mlx): logits of the unused ids are filled with the fp32 minimum (hub `masked_fill(min_value_of_dtype)`;
  mlx, vllm use -inf). The ids come from the tokenizer, not config.json: 100256, 100258-100260 (fim),
  100264, 100265, 100267-100275, 100276 (<|endofprompt|>) and 100277-100351 (padding) -- 91 ids.
  Applied when vocab_size is 100352; a config may list its own `dummy_token_indices` instead.
Tokenizer (hub tokenization_phi3_small.py): tiktoken cl100k_base ranks (file cl100k_base.tiktoken) with
  cl100k's pre-tokenizer regex, plus the special tokens <|endoftext|> 100257, <|system|> 100261,
  <|user|> 100262, <|assistant|> 100263, <|end|> 100266 and the fim/dummy ids above; no BOS is added.
  See `tiktoken_tokenizer_json`.

Not pinned down (and what depends on it):
  * The 128k config.json itself is not stored anywhere searched: its rope_scaling values are read
    from the checkpoint, and their meaning is pinned by positional_embedding.py (above).
  * rope_position_scale != 1: the hub multiplies positions, vllm divides. The hub is followed; no
    released config (8k: 1.0; 128k: LongRoPE, where the hub ignores it) depends on it.
  * Left-padded batches: the stored triton_flash_blocksparse_attn.py lacks the padded kernel the hub
    uses with an attention mask, so whether its blocks count from the first real token is unknown.
    Blocks here count from each row's first token (vllm does the same); exports take right-padded
    batches (GroupQueryAttention's convention), so only the hub's own left-padded runs could differ.
  * The chat template (hub tokenizer_config.json not stored): `write_tokenizer` keeps the source's.
  No short name depends on these: phi-3-small-8k and phi-3-small-128k are both built.

Limits of this export:
  * Sparse layers run ORT GroupQueryAttention with an `attention_bias` input (0 / -inf) computed in the
    graph from the positions, so a prompt of S tokens materialises a [batch, heads, S, total] bias (the
    size of the attention probabilities ORT's CPU kernel already holds; decode steps: [batch, heads, 1,
    total]). ORT's SparseAttention contrib op (what onnxruntime-genai's builder emits) would skip the
    masked blocks, but its CPU kernel (ORT 1.32) requires past and present KV to be one shared buffer
    (checked: it fails otherwise), so such a graph runs only under onnxruntime-genai's shared-buffer
    mode, not in a plain session loop; it is not used.
  * CUDA (fp16) exports use the same graph; GroupQueryAttention's attention_bias on CUDA was not
    verified here (no GPU), so those exports are unverified.
  * The tokenizer is converted from cl100k_base.tiktoken by `write_tokenizer`, which the export
    pipeline has to call (and a hub download has to fetch that file); without it the export has no
    tokenizer.json.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from phi_onnx.errors import CheckpointError, UnsupportedModelError
from phi_onnx.export.base import DecoderBuilder, raise_shape
from phi_onnx.export.graph import Value
from phi_onnx.export.layers import (
    AttentionInputs,
    apply_rotary,
    gqa_fuses_rotary,
    layer_norm,
    residual_sum,
    rotary_inv_freq,
)
from phi_onnx.export.options import ExportOptions
from phi_onnx.export.registry import register
from phi_onnx.source.checkpoint import Checkpoint
from phi_onnx.source.config import ModelConfig, RopeConfig

#: Vocabulary size of the Phi-3-small tokenizer (cl100k_base padded to a multiple of 64).
VOCAB_SIZE = 100352
#: Ids the Phi-3-small tokenizer never produces; their logits are masked (see FACTS).
DUMMY_TOKEN_IDS: tuple[int, ...] = (100256, 100258, 100259, 100260, 100264, 100265, *range(100267, 100352))
#: Special tokens of the Phi-3-small tokenizer (hub tokenization_phi3_small.py SPECIAL_TOKENS).
SPECIAL_TOKENS: dict[str, int] = {
    "<|endoftext|>": 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259, "<|fim_suffix|>": 100260,
    "<|system|>": 100261, "<|user|>": 100262, "<|assistant|>": 100263, "<|dummy_id_0|>": 100264,
    "<|dummy_id_1|>": 100265, "<|end|>": 100266, "<|dummy_id_2|>": 100256,
    **{f"<|dummy_id_{i}|>": 100264 + i for i in range(3, 12)},  # 100267..100275
    "<|endofprompt|>": 100276,
    **{f"<|dummy_id_{11 + i}|>": 100276 + i for i in range(1, VOCAB_SIZE - 100276)},  # 100277..100351
}
#: tiktoken cl100k_base's pre-tokenizer pattern (the hub tokenizer uses `cl100k_base._pat_str`).
CL100K_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclasses.dataclass(frozen=True)
class Phi3SmallSettings:
    """The family-specific config keys, read once from config.json."""

    dense_every: int | None
    block_size: int
    local_blocks: int
    vert_stride: int
    homo_heads: bool
    attn_scale: float
    embedding_multiplier: float | None
    width_multiplier: float | None
    gegelu_limit: float | None
    position_scale: float
    dummy_token_ids: tuple[int, ...]

    def is_dense(self, layer: int) -> bool:
        """Whether layer `layer` (0-based) uses dense attention (the others are block-sparse)."""
        return bool(self.dense_every) and (layer + 1) % int(self.dense_every) == 0

    def head_step(self, heads: int) -> int:
        """How far each query head shifts the vertical stripes (0: every head shares one pattern)."""
        return 0 if self.homo_heads else max(1, int(self.vert_stride / heads))


def _number(raw: dict[str, Any], key: str, default: Any) -> Any:
    value = raw.get(key, default)
    return default if value is None and default is not None else value


def intermediate_size(raw: dict[str, Any]) -> int:
    """`ff_intermediate_size`, or the size `ff_dim_multiplier` implies (hub `intermediate_size`)."""
    size = raw.get("ff_intermediate_size")
    if size is not None:
        return int(size)
    multiplier = raw.get("ff_dim_multiplier")
    if multiplier is None:
        raise CheckpointError("config.json sets neither ff_intermediate_size nor ff_dim_multiplier.",
                              hint="Phi-3-small configs set ff_intermediate_size (14336).")
    size = int(multiplier) * (int(raw["hidden_size"]) // 3) * 2
    if raw.get("gegelu_pad_to_256", True):
        size = -(-size // 256) * 256
    return size


def read_settings(cfg: ModelConfig) -> Phi3SmallSettings:
    """Phi-3-small's own keys, validated (UnsupportedModelError for what cannot be built)."""
    raw = cfg.raw
    act = raw.get("hidden_act", "gegelu")
    if act != "gegelu":
        raise UnsupportedModelError(f"Phi3SmallForCausalLM with hidden_act={act!r} is not supported.",
                                    hint="Phi-3-small checkpoints use 'gegelu'.")
    block = int(_number(raw, "blocksparse_block_size", 64))
    local = int(_number(raw, "blocksparse_num_local_blocks", 16))
    stride = int(_number(raw, "blocksparse_vert_stride", 8))
    if block < 1 or local < 1 or stride < 1:
        raise CheckpointError(f"Invalid block-sparse settings: block size {block}, {local} local blocks, "
                              f"vertical stride {stride}.", hint="Each must be a positive integer.")
    head_dim = cfg.hidden_size // cfg.num_heads
    if _number(raw, "mup_use_scaling", True):
        scale = float(_number(raw, "mup_attn_multiplier", 1.0)) / head_dim
    else:
        scale = 1.0 / math.sqrt(head_dim)
    emb = raw.get("mup_embedding_multiplier", 10.0)
    width = raw.get("mup_width_multiplier", 8.0)
    limit = raw.get("gegelu_limit", 20.0)
    dummies = raw.get("dummy_token_indices")
    if dummies is None:
        dummies = DUMMY_TOKEN_IDS if cfg.vocab_size == VOCAB_SIZE else ()
    dummies = tuple(sorted({int(i) for i in dummies}))
    if any(i < 0 or i >= cfg.vocab_size for i in dummies):
        raise CheckpointError("dummy_token_indices holds ids outside the vocabulary.",
                              hint=f"Ids must lie in [0, {cfg.vocab_size}).")
    dense_every = raw.get("dense_attention_every_n_layers")
    return Phi3SmallSettings(
        dense_every=int(dense_every) if dense_every else None, block_size=block, local_blocks=local,
        vert_stride=stride, homo_heads=bool(raw.get("blocksparse_homo_head_pattern", False)), attn_scale=scale,
        embedding_multiplier=float(emb) if emb is not None and float(emb) > 0 else None,
        width_multiplier=float(width) if width else None,
        gegelu_limit=float(limit) if limit is not None else None,
        position_scale=float(_number(raw, "rope_position_scale", 1.0)),
        dummy_token_ids=dummies)


def _mscales(cfg: ModelConfig) -> tuple[float, float]:
    """LongRoPE's cos/sin factors (short, long) by the hub's rule; (1, 1) without rope_scaling."""
    raw = cfg.raw
    scaling = raw.get("rope_scaling") if isinstance(raw.get("rope_scaling"), dict) else {}
    if not scaling:
        return 1.0, 1.0
    short_mscale = float(scaling.get("short_mscale") or -1)
    long_mscale = float(scaling.get("long_mscale") or -1)
    original = _original_context(raw)
    ratio = cfg.max_position_embeddings / original
    default_long = 1.0 if ratio <= 1.0 else math.sqrt(1 + math.log(ratio) / math.log(original))
    return (short_mscale if short_mscale > 0 else 1.0), (long_mscale if long_mscale > 0 else default_long)


def _original_context(raw: dict[str, Any]) -> int:
    scaling = raw.get("rope_scaling") or {}
    value = scaling.get("original_max_position_embeddings") or raw.get("original_max_position_embeddings")
    if not value:
        raise CheckpointError("rope_scaling has no original_max_position_embeddings.",
                              hint="Phi-3-small-128k's rope_scaling names it (8192).")
    return int(value)


def model_config(cfg: ModelConfig) -> ModelConfig:
    """The generic config with Phi-3-small's spellings applied (rope base, LayerNorm eps, MLP width, ties)."""
    raw = cfg.raw
    head_dim = cfg.hidden_size // cfg.num_heads
    theta = float(_number(raw, "rope_embedding_base", 1e6))
    scaling = raw.get("rope_scaling")
    rope = RopeConfig(theta=theta, rotary_dim=head_dim)
    if isinstance(scaling, dict):
        kind = str(scaling.get("type") or scaling.get("rope_type") or "")
        if kind not in ("longrope", "su"):
            raise UnsupportedModelError(f"Phi-3-small with rope_scaling type {kind!r} is not supported.",
                                        hint="Phi-3-small-128k uses LongRoPE ('longrope' or 'su').")
        short = tuple(float(x) for x in scaling.get("short_factor") or ())
        long = tuple(float(x) for x in scaling.get("long_factor") or ())
        if len(short) != head_dim // 2 or len(long) != head_dim // 2:
            raise CheckpointError(
                f"LongRoPE factor lists have lengths {len(short)} (short) and {len(long)} (long); "
                f"head_dim {head_dim} needs {head_dim // 2} each.", hint="The config's rope_scaling is inconsistent.")
        # The hub scales cos/sin by short_mscale or long_mscale: the shared rotary's two attention factors.
        short_mscale, long_mscale = _mscales(cfg)
        rope = RopeConfig(theta=theta, rotary_dim=head_dim, kind="longrope", short_factor=short, long_factor=long,
                          original_max_position_embeddings=_original_context(raw), attention_factor=short_mscale,
                          long_attention_factor=long_mscale)
    return dataclasses.replace(
        cfg, head_dim=head_dim, rope=rope, sliding_window=None, intermediate_size=intermediate_size(raw),
        norm_eps=float(_number(raw, "layer_norm_epsilon", 1e-5)), hidden_act="gegelu",
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", True)))


def qkv_rows(heads: int, kv_heads: int, head_dim: int) -> np.ndarray:
    """Row order taking the per-KV-group [q.., k, v] layout to [all q | all k | all v]."""
    per = heads // kv_heads
    groups = np.arange(kv_heads * (per + 2) * head_dim).reshape(kv_heads, per + 2, head_dim)
    return np.concatenate([groups[:, :per].reshape(-1), groups[:, per].reshape(-1), groups[:, per + 1].reshape(-1)])


def gegelu_rows(intermediate: int) -> np.ndarray:
    """Row order taking up_proj's interleaved [gelu, linear] columns to [all gelu | all linear]."""
    return np.concatenate([np.arange(0, 2 * intermediate, 2), np.arange(1, 2 * intermediate, 2)])


@register("Phi3SmallForCausalLM")
class Phi3SmallBuilder(DecoderBuilder):
    """Builds `Phi3SmallForCausalLM` checkpoints (Phi-3-small-8k/128k-instruct)."""

    genai_type = "phi3small"

    def __init__(self, config: ModelConfig, checkpoint: Checkpoint, options: ExportOptions) -> None:
        self.settings = read_settings(config)
        super().__init__(model_config(config), checkpoint, options)
        self._sparse_bias: Value | None = None
        self._inputs: AttentionInputs | None = None
        self._total64: Value | None = None

    def write_assets(self, source: Path, folder: Path) -> None:
        """Convert the hub's tiktoken ranks to a tokenizer.json (the hub tokenizer is remote code)."""
        write_tokenizer(source, folder)

    # -- attention inputs with the hub's rotary semantics ------------------------------------
    # Built inside the first layer that needs them, once for all layers.
    def total_length64(self) -> Value:
        """The attention mask's width (past + new tokens) as an int64 scalar."""
        if self._total64 is None:
            g = self.g
            attention_mask = g.inputs[1]
            assert attention_mask.name == "attention_mask"
            with g.scope("attn_mask"):
                self._total64 = g.op("Gather", g.op("Shape", attention_mask), g.const(1, np.int64), axis=0)
        return self._total64

    def hub_inputs(self, attn: AttentionInputs) -> AttentionInputs:
        """The shared attention inputs with the hub's rotary semantics.

        `attention_inputs` (layers.py) already picks LongRoPE's factors per forward the way the hub
        does, and scales cos/sin by short_mscale or long_mscale (`model_config` sets them as the
        rope's two attention factors). Without LongRoPE the hub multiplies positions by
        rope_position_scale (no released config does; the layers.py tables are then left unused).
        """
        if self._inputs is not None:
            return self._inputs
        g, cfg, s = self.g, self.cfg, self.settings
        cos, sin = attn.cos, attn.sin
        with g.scope("rotary_emb"):
            if cfg.rope.kind != "longrope" and s.position_scale != 1.0:
                steps = g.op("Cast", g.op("Range", g.const(0, np.int64), self.total_length64(), g.const(1, np.int64)),
                             to=ir.DataType.FLOAT)
                steps = g.op("Mul", steps, g.const(s.position_scale, np.float32))
                freqs = g.op("Mul", g.op("Unsqueeze", steps, g.const([1], np.int64)),
                             g.const(rotary_inv_freq(cfg.rope)[None, :]))
                cos, sin = g.op("Cos", freqs), g.op("Sin", freqs)
                if self.w.io_dtype != ir.DataType.FLOAT:
                    cos, sin = g.op("Cast", cos, to=self.w.io_dtype), g.op("Cast", sin, to=self.w.io_dtype)
        self._inputs = AttentionInputs(attn.seqlens_k, attn.total_length, cos, sin, attn.positions)
        return self._inputs

    def sparse_bias(self, attn: AttentionInputs) -> Value:
        """[batch, heads or 1, seq, total] 0 / -inf: the block-sparse pattern, built once per forward."""
        if self._sparse_bias is not None:
            return self._sparse_bias
        g, cfg, s = self.g, self.cfg, self.settings
        positions, total64 = attn.positions, self.total_length64()
        with g.scope("block_sparse"):
            block = g.const(s.block_size, np.int64)
            key_blocks = g.op("Div", g.op("Range", g.const(0, np.int64), total64, g.const(1, np.int64)), block)
            query_blocks = g.op("Unsqueeze", g.op("Div", positions, block), g.const([2], np.int64))
            # Keys in one of the last `local_blocks` blocks (later keys are masked by causality).
            local = g.op("Less", g.op("Sub", query_blocks, key_blocks), g.const(s.local_blocks, np.int64))
            step = s.head_step(cfg.num_heads)
            heads = cfg.num_heads if step else 1
            shift = g.const((np.arange(heads, dtype=np.int64) * step + 1).reshape(heads, 1))
            stripes = g.op("Equal", g.op("Mod", g.op("Add", g.op("Unsqueeze", key_blocks, g.const([0], np.int64)),
                                                      shift), g.const(s.vert_stride, np.int64)),
                           g.const(0, np.int64))
            allowed = g.op("Or", g.op("Unsqueeze", local, g.const([1], np.int64)),
                           g.op("Unsqueeze", stripes, g.const([0, 2], np.int64)))
            dtype = np.float16 if self.w.io_dtype == ir.DataType.FLOAT16 else np.float32
            self._sparse_bias = g.op("Where", allowed, g.const(0, dtype), g.const(-np.inf, dtype))
        return self._sparse_bias

    # -- layers ---------------------------------------------------------------------------------
    def check(self) -> None:
        """Refuse head layouts the packed QKV or GroupQueryAttention cannot take."""
        cfg = self.cfg
        if cfg.num_heads * cfg.head_dim != cfg.hidden_size or cfg.head_dim % 8:
            raise UnsupportedModelError(
                f"Phi-3-small with hidden_size {cfg.hidden_size} and {cfg.num_heads} heads is not supported.",
                hint="GroupQueryAttention needs hidden_size / num_attention_heads to be a multiple of 8 "
                     "(Phi-3-small: 4096 / 32 = 128).")

    def _linear(self, x: Value, scope: str, name: str, out_features: int, in_features: int,
                rows: np.ndarray | None = None) -> Value:
        """`x @ W.T + b` from `<name>.weight` / `<name>.bias`, rows reordered by `rows` when given."""
        weight, bias = f"{name}.weight", f"{name}.bias"
        info = self.ckpt.info(weight)
        if info.shape != (out_features, in_features):
            raise_shape(weight, info.shape, (out_features, in_features))
        load_w, load_b = self.load(weight), None
        if bias in self.ckpt:
            if self.ckpt.info(bias).shape != (out_features,):
                raise_shape(bias, self.ckpt.info(bias).shape, (out_features,))
            load_b = self.load(bias)
        if rows is not None:
            load_w = _permuted(load_w, rows)
            load_b = _permuted(load_b, rows) if load_b is not None else None
        return self.w.linear(self.g, x, scope, out_features, in_features, load_w, load_b)

    def norm(self, name: str, x: Value, residual: Value | None) -> tuple[Value, Value]:
        """`residual + x` (when there is a residual) and LayerNorm `name` of it: (normed, new residual).

        LayerNormalization after a Sum, not SkipLayerNormalization: ORT's CPU kernel for the latter
        computes the variance in one pass and loses digits on activations far from zero (layers.py).
        """
        g, h = self.g, self.cfg.hidden_size
        gamma, beta = self.param(f"{name}.weight", (h,)), self.param(f"{name}.bias", (h,))
        with g.scope(name.rsplit(".", 1)[-1]):
            total = x if residual is None else residual_sum(g, residual, x)
            return layer_norm(g, total, gamma, beta, self.cfg.norm_eps), total

    def layer(self, i: int, hidden: Value, residual: Value | None, attn: AttentionInputs,
              past: tuple[Value, Value]) -> tuple[Value, Value, tuple[Value, Value]]:
        """input LayerNorm → dense or block-sparse attention → post-attention LayerNorm → gegelu MLP."""
        cfg, s, g, p = self.cfg, self.settings, self.g, f"model.layers.{i}."
        attn = self.hub_inputs(attn)
        if residual is None and s.embedding_multiplier is not None:
            with g.scope("embed_scale"):
                dtype = np.float16 if self.w.io_dtype == ir.DataType.FLOAT16 else np.float32
                hidden = g.op("Mul", hidden, g.const(s.embedding_multiplier, dtype))
        x, residual = self.norm(p + "input_layernorm", hidden, residual)
        with g.scope("attn"):
            heads, kv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
            qkv = self._linear(x, "qkv_proj", p + "self_attn.query_key_value", (heads + 2 * kv) * d, cfg.hidden_size,
                               rows=qkv_rows(heads, kv, d))
            bias = None if s.is_dense(i) else self.sparse_bias(attn)
            out, present_key, present_value = self.attention(qkv, attn, past, bias)
            hidden = self._linear(out, "o_proj", p + "self_attn.dense", cfg.hidden_size, heads * d)
        x, residual = self.norm(p + "post_attention_layernorm", hidden, residual)
        with g.scope("mlp"):
            inter = cfg.intermediate_size
            up = self._linear(x, "up_proj", p + "mlp.up_proj", 2 * inter, cfg.hidden_size, rows=gegelu_rows(inter))
            hidden = self._linear(self.gegelu(up), "down_proj", p + "mlp.down_proj", cfg.hidden_size, inter)
        return hidden, residual, (present_key, present_value)

    def attention(self, qkv: Value, attn: AttentionInputs, past: tuple[Value, Value],
                  bias: Value | None) -> tuple[Value, Value, Value]:
        """GroupQueryAttention over packed QKV with the muP scale; `bias` carries the sparse pattern."""
        g, cfg = self.g, self.cfg
        heads, kv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        fused = gqa_fuses_rotary(cfg.rope)
        query, key, value = qkv, None, None
        if not fused:
            query, key, value = g.op("Split", qkv, g.const([heads * d, kv * d, kv * d], np.int64), axis=-1, outputs=3)
            query = apply_rotary(g, query, heads, d, d, attn)
            key = apply_rotary(g, key, kv, d, d, attn)
        inputs = [query, key, value, past[0], past[1], attn.seqlens_k, attn.total_length,
                  attn.cos if fused else None, attn.sin if fused else None, None, bias]
        while inputs[-1] is None:
            inputs.pop()
        out, present_key, present_value = g.ms(
            "GroupQueryAttention", *inputs, outputs=3, num_heads=heads, kv_num_heads=kv, do_rotary=int(fused),
            rotary_interleaved=0, scale=float(self.settings.attn_scale))
        return out, present_key, present_value

    def gegelu(self, up: Value) -> Value:
        """quick_gelu(clamped gelu half) * (clamped linear half + 1), halves already de-interleaved."""
        g, inter, limit = self.g, self.cfg.intermediate_size, self.settings.gegelu_limit
        gelu, linear = g.op("Split", up, g.const([inter, inter], np.int64), axis=-1, outputs=2)
        dtype = np.float16 if self.w.io_dtype == ir.DataType.FLOAT16 else np.float32
        if limit is not None:
            # Finite values are clamped; +-inf pass through unchanged (the hub's torch.where(isinf, ...)).
            gelu = g.op("Where", g.op("IsInf", gelu), gelu, g.op("Clip", gelu, None, g.const(limit, dtype)))
            linear = g.op("Where", g.op("IsInf", linear), linear,
                          g.op("Clip", linear, g.const(-limit, dtype), g.const(limit, dtype)))
        activated = g.ms("QuickGelu", gelu, alpha=1.702)
        return g.op("Mul", activated, g.op("Add", linear, g.const(1, dtype)))

    def final_norm(self, hidden: Value, residual: Value) -> Value:
        """model.final_layernorm of the last residual sum."""
        return self.norm("model.final_layernorm", hidden, residual)[0]

    def lm_head(self, x: Value) -> Value:
        """Tied LM head, logits / mup_width_multiplier, unused token ids filled with the dtype minimum."""
        g, cfg, s = self.g, self.cfg, self.settings
        name = "lm_head.weight" if not cfg.tie_word_embeddings and "lm_head.weight" in self.ckpt \
            else "model.embed_tokens.weight"
        logits = self.linear(x, "lm_head", name, cfg.vocab_size, cfg.hidden_size)
        dtype = np.float16 if self.w.io_dtype == ir.DataType.FLOAT16 else np.float32
        with g.scope("lm_head"):
            if s.width_multiplier is not None:
                logits = g.op("Div", logits, g.const(s.width_multiplier, dtype))
            if s.dummy_token_ids:
                mask = np.zeros(cfg.vocab_size, dtype=bool)
                mask[list(s.dummy_token_ids)] = True
                logits = g.op("Where", g.const(mask), g.const(np.finfo(dtype).min, dtype), logits)
        return logits


def _permuted(load: Any, rows: np.ndarray) -> Any:
    return lambda: np.ascontiguousarray(load()[rows])


# -- tokenizer ----------------------------------------------------------------------------------
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable character map (what byte-level BPE vocabularies use)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def read_tiktoken(path: Path) -> dict[bytes, int]:
    """A `.tiktoken` file (one `base64(token) rank` per line) as token bytes → rank."""
    ranks: dict[bytes, int] = {}
    for line in path.read_bytes().splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _merge_of(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The pair whose merge creates `token`: run BPE on its bytes with only lower-ranked merges."""
    rank = ranks[token]
    parts = [token[i:i + 1] for i in range(len(token))]
    while True:
        best, best_rank = None, None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < rank and (best_rank is None or r < best_rank):
                best, best_rank = i, r
        if best is None:
            break
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    if len(parts) != 2:
        raise CheckpointError(f"The tiktoken ranks cannot build token {token!r} from one merge.",
                              hint="The .tiktoken file is not a byte-level BPE vocabulary.")
    return parts[0], parts[1]


def tiktoken_tokenizer_json(ranks: dict[bytes, int], special_tokens: dict[str, int],
                            pattern: str = CL100K_PATTERN) -> dict[str, Any]:
    """A Hugging Face `tokenizer.json` equivalent to a tiktoken encoding (byte-level BPE).

    tiktoken merges the adjacent pair whose concatenation has the lowest rank; with the merges
    listed in rank order (each token's merge recovered by re-running BPE on its bytes), the
    `tokenizers` BPE model applies the same merges in the same order.
    """
    chars = _bytes_to_unicode()

    def text(token: bytes) -> str:
        return "".join(chars[b] for b in token)

    vocab = {text(token): rank for token, rank in ranks.items()}
    merges = [[text(a), text(b)] for a, b in (_merge_of(token, ranks) for token in
                                              sorted((t for t in ranks if len(t) > 1), key=ranks.__getitem__))]
    added = [{"id": i, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True}
             for content, i in sorted(special_tokens.items(), key=lambda item: item[1])]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": vocab, "merges": merges},
    }


def write_tokenizer(source: Path, output: Path) -> bool:
    """Write tokenizer.json and tokenizer_config.json for a checkpoint that ships cl100k_base.tiktoken.

    The hub's Phi3SmallTokenizer is remote code around tiktoken; this writes the same tokenizer as a
    byte-level BPE `tokenizer.json` that `tokenizers`, transformers' PreTrainedTokenizerFast and
    onnxruntime-genai (onnxruntime-extensions) load. The source's tokenizer_config.json keeps its chat
    template and token strings; its `tokenizer_class`/`auto_map` (remote code) are replaced. Run it after
    the source's tokenizer files were copied. Returns False, writing nothing, when `source` has no
    cl100k_base.tiktoken or already has a tokenizer.json.
    """
    tiktoken = source / "cl100k_base.tiktoken"
    if not tiktoken.is_file() or (source / "tokenizer.json").is_file():
        return False
    data = tiktoken_tokenizer_json(read_tiktoken(tiktoken), SPECIAL_TOKENS)
    (output / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    config: dict[str, Any] = {}
    if (source / "tokenizer_config.json").is_file():
        try:
            config = json.loads((source / "tokenizer_config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            config = {}
    kept = {key: config[key] for key in ("chat_template", "model_max_length", "bos_token", "eos_token", "pad_token")
            if isinstance(config.get(key), (str, int))}
    result = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
              "pad_token": "<|endoftext|>", "add_bos_token": False, "add_eos_token": False,
              "clean_up_tokenization_spaces": False, **kept}
    (output / "tokenizer_config.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    return True
