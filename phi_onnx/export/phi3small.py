"""Phi-3-small, 8k and 128k (`Phi3SmallForCausalLM`): block-sparse and dense attention, gegelu, muP.

transformers has no implementation: the hub model is remote code (modeling_phi3_small.py) that needs
flash-attn and Triton on CUDA. Nothing here runs or imports it; the graph is built from the facts
below, each with the public file it was read from. The tests hold a small PyTorch reference written
from the same facts (tests/export/phi3small_reference.py).

The config keys below are read in phi_onnx/source/phi3small.py (`cfg.family` holds them here).

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
  See `write_tokenizer` and export/tiktoken_bpe.py.

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

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from phi_onnx.errors import UnsupportedModelError
from phi_onnx.export.base import DecoderBuilder
from phi_onnx.export.graph import Value
from phi_onnx.export.layers import AttentionInputs, group_query_attention, residual_sum, rotary_inv_freq
from phi_onnx.export.options import ExportOptions
from phi_onnx.export.tiktoken_bpe import read_tiktoken, tiktoken_tokenizer_json
from phi_onnx.source.checkpoint import Checkpoint
from phi_onnx.source.config import ModelConfig
from phi_onnx.source.phi3small import VOCAB_SIZE, Phi3SmallSettings, normalise

#: Special tokens of the Phi-3-small tokenizer (hub tokenization_phi3_small.py SPECIAL_TOKENS).
SPECIAL_TOKENS: dict[str, int] = {
    "<|endoftext|>": 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259, "<|fim_suffix|>": 100260,
    "<|system|>": 100261, "<|user|>": 100262, "<|assistant|>": 100263, "<|dummy_id_0|>": 100264,
    "<|dummy_id_1|>": 100265, "<|end|>": 100266, "<|dummy_id_2|>": 100256,
    **{f"<|dummy_id_{i}|>": 100264 + i for i in range(3, 12)},  # 100267..100275
    "<|endofprompt|>": 100276,
    **{f"<|dummy_id_{11 + i}|>": 100276 + i for i in range(1, VOCAB_SIZE - 100276)},  # 100277..100351
}


def qkv_rows(heads: int, kv_heads: int, head_dim: int) -> np.ndarray:
    """Row order taking the per-KV-group [q.., k, v] layout to [all q | all k | all v]."""
    per = heads // kv_heads
    groups = np.arange(kv_heads * (per + 2) * head_dim).reshape(kv_heads, per + 2, head_dim)
    return np.concatenate([groups[:, :per].reshape(-1), groups[:, per].reshape(-1), groups[:, per + 1].reshape(-1)])


def gegelu_rows(intermediate: int) -> np.ndarray:
    """Row order taking up_proj's interleaved [gelu, linear] columns to [all gelu | all linear]."""
    return np.concatenate([np.arange(0, 2 * intermediate, 2), np.arange(1, 2 * intermediate, 2)])


class Phi3SmallBuilder(DecoderBuilder):
    """Builds `Phi3SmallForCausalLM` checkpoints (Phi-3-small-8k/128k-instruct)."""

    genai_type = "phi3small"

    def __init__(self, config: ModelConfig, checkpoint: Checkpoint, options: ExportOptions) -> None:
        if not isinstance(config.family, Phi3SmallSettings):  # a ModelConfig not made by parse_config
            config = normalise(config)
        super().__init__(config, checkpoint, options)
        self.settings: Phi3SmallSettings = config.family

    def write_assets(self, source: Path, folder: Path) -> None:
        """Convert the hub's tiktoken ranks to a tokenizer.json (the hub tokenizer is remote code)."""
        write_tokenizer(source, folder)

    # -- per-forward inputs ---------------------------------------------------------------------
    def model_inputs(self, input_ids: Value, attention_mask: Value) -> AttentionInputs:
        """The shared attention inputs with the hub's rotary semantics, and the block-sparse bias.

        `attention_inputs` (layers.py) already picks LongRoPE's factors per forward the way the hub
        does, and scales cos/sin by short_mscale or long_mscale (`model_config` sets them as the
        rope's two attention factors). Without LongRoPE the hub multiplies positions by
        rope_position_scale (no released config does; the layers.py tables are then left unused).
        """
        attn = super().model_inputs(input_ids, attention_mask)
        g, cfg, s = self.g, self.cfg, self.settings
        rescaled = cfg.rope.kind != "longrope" and s.position_scale != 1.0
        sparse = any(not s.is_dense(i) for i in range(cfg.num_layers))
        if not rescaled and not sparse:
            return attn
        with g.scope("model", "attn_mask"):
            total64 = g.op("Gather", g.op("Shape", attention_mask), g.const(1, np.int64), axis=0)
        cos, sin, bias = attn.cos, attn.sin, None
        if rescaled:
            with g.scope("model", "rotary_emb"):
                steps = g.op("Cast", g.op("Range", g.const(0, np.int64), total64, g.const(1, np.int64)),
                             to=ir.DataType.FLOAT)
                steps = g.op("Mul", steps, g.const(s.position_scale, np.float32))
                freqs = g.op("Mul", g.op("Unsqueeze", steps, g.const([1], np.int64)),
                             g.const(rotary_inv_freq(cfg.rope)[None, :]))
                cos, sin = g.op("Cos", freqs), g.op("Sin", freqs)
                if self.w.io_dtype != ir.DataType.FLOAT:
                    cos, sin = g.op("Cast", cos, to=self.w.io_dtype), g.op("Cast", sin, to=self.w.io_dtype)
        if sparse:
            with g.scope("model", "block_sparse"):
                bias = self.sparse_bias(attn.positions, total64)
        return dataclasses.replace(attn, cos=cos, sin=sin, attention_bias=bias)

    def sparse_bias(self, positions: Value, total64: Value) -> Value:
        """[batch, heads or 1, seq, total] 0 / -inf: the block-sparse pattern, from each token's position."""
        g, cfg, s = self.g, self.cfg, self.settings
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
        return g.op("Where", allowed, g.const(0, self.w.np_dtype), g.const(-np.inf, self.w.np_dtype))

    def embedding(self, input_ids: Value) -> Value:
        """The embedding rows, times mup_embedding_multiplier when the config sets one."""
        hidden = super().embedding(input_ids)
        if self.settings.embedding_multiplier is None:
            return hidden
        return self.g.op("Mul", hidden, self.g.const(self.settings.embedding_multiplier, self.w.np_dtype))

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
        """`x @ W.T + b` from `<name>.weight` and `<name>.bias` (when present), rows reordered by `rows`."""
        bias = f"{name}.bias"
        return self.linear(x, scope, f"{name}.weight", out_features, in_features,
                           bias=bias if bias in self.ckpt else None, rows=rows)

    def norm(self, name: str, x: Value, residual: Value | None) -> tuple[Value, Value]:
        """`residual + x` (when there is a residual) and LayerNorm `name` of it: (normed, new residual).

        LayerNormalization after a Sum, not SkipLayerNormalization: ORT's CPU kernel for the latter
        computes the variance in one pass and loses digits on activations far from zero (layers.py).
        """
        total = x
        if residual is not None:
            with self.g.scope(name.rsplit(".", 1)[-1]):
                total = residual_sum(self.g, residual, x)
        return self.layer_norm(name, total), total

    def layer(self, i: int, hidden: Value, residual: Value | None, attn: AttentionInputs,
              past: tuple[Value, Value]) -> tuple[Value, Value, tuple[Value, Value]]:
        """input LayerNorm → dense or block-sparse attention → post-attention LayerNorm → gegelu MLP."""
        cfg, s, g, p = self.cfg, self.settings, self.g, f"model.layers.{i}."
        x, residual = self.norm(p + "input_layernorm", hidden, residual)
        with g.scope("attn"):
            heads, kv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
            qkv = self._linear(x, "qkv_proj", p + "self_attn.query_key_value", (heads + 2 * kv) * d, cfg.hidden_size,
                               rows=qkv_rows(heads, kv, d))
            bias = None if s.is_dense(i) else attn.attention_bias
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
        return group_query_attention(self.g, qkv, self.cfg, attn, past[0], past[1],
                                     scale=float(self.settings.attn_scale), attention_bias=bias)

    def gegelu(self, up: Value) -> Value:
        """quick_gelu(clamped gelu half) * (clamped linear half + 1), halves already de-interleaved."""
        g, inter, limit = self.g, self.cfg.intermediate_size, self.settings.gegelu_limit
        gelu, linear = g.op("Split", up, g.const([inter, inter], np.int64), axis=-1, outputs=2)
        dtype = self.w.np_dtype
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
        logits = super().lm_head(x)
        dtype = self.w.np_dtype
        with g.scope("lm_head"):
            if s.width_multiplier is not None:
                logits = g.op("Div", logits, g.const(s.width_multiplier, dtype))
            if s.dummy_token_ids:
                mask = np.zeros(cfg.vocab_size, dtype=bool)
                mask[list(s.dummy_token_ids)] = True
                logits = g.op("Where", g.const(mask), g.const(np.finfo(dtype).min, dtype), logits)
        return logits


# -- tokenizer ----------------------------------------------------------------------------------
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
