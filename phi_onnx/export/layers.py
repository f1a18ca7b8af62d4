"""Transformer building blocks as graph functions: norms, rotary, attention, MLP.

Each takes the GraphBuilder first and returns values, so a family's layer code reads like its
PyTorch forward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NoReturn

import numpy as np
import onnx_ir as ir

from phi_onnx.errors import CheckpointError
from phi_onnx.export.graph import GraphBuilder, Value
from phi_onnx.source.checkpoint import Checkpoint
from phi_onnx.source.config import ModelConfig, RopeConfig


@dataclass
class AttentionInputs:
    """Per-forward values every attention layer shares (computed once from the attention mask)."""

    seqlens_k: Value  # int32 [batch]: valid tokens so far - 1
    total_length: Value  # int32 scalar: attention_mask width
    cos: Value  # [total_length, rotary_dim / 2] in the activation dtype
    sin: Value
    positions: Value  # int64 [batch, seq]: each new token's position
    #: An additive [batch, heads or 1, seq, total] bias for the layers that take one (Phi-3-small's
    #: block-sparse pattern); None for the others.
    attention_bias: Value | None = None


def rms_norm(g: GraphBuilder, x: Value, gamma: Value, eps: float) -> Value:
    """RMSNorm computed in fp32 (ORT SimplifiedLayerNormalization)."""
    return g.op("SimplifiedLayerNormalization", x, gamma, axis=-1, epsilon=eps, stash_type=1)


def skip_rms_norm(g: GraphBuilder, x: Value, residual: Value, gamma: Value, eps: float) -> tuple[Value, Value]:
    """`residual + x` and its RMSNorm in one fused op; returns (normed, new residual)."""
    normed, _, _, total = g.ms("SkipSimplifiedLayerNormalization", x, residual, gamma, outputs=4, epsilon=eps)
    return normed, total


def gqa_fuses_rotary(rope: RopeConfig) -> bool:
    """GroupQueryAttention's fused rotary needs the cos/sin width (rotary_dim / 2) a multiple of 8."""
    return rope.rotary_dim > 0 and (rope.rotary_dim // 2) % 8 == 0


def rotary_inv_freq(rope: RopeConfig, factors: tuple[float, ...] = ()) -> np.ndarray:
    """Inverse frequencies exactly as transformers computes them (fp32, optional LongRoPE factors)."""
    exponent = np.arange(0, rope.rotary_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(rope.rotary_dim)
    base = np.float32(rope.theta) ** exponent
    if factors:
        base = np.asarray(factors, dtype=np.float32) * base
    return (np.float32(1.0) / base).astype(np.float32)


def attention_inputs(g: GraphBuilder, cfg: ModelConfig, input_ids: Value, attention_mask: Value,
                     dtype: ir.DataType) -> AttentionInputs:
    """seqlens_k, total length and the rotary cos/sin tables, computed in the graph.

    The tables cover only positions < total length and are computed from the inverse frequencies,
    so no [max_positions, dim] cache is stored, and LongRoPE picks its factors per forward the way
    transformers does (long factors once the sequence exceeds the original context).
    """
    rope = cfg.rope
    with g.scope("model", "attn_mask"):
        valid = g.op("ReduceSum", attention_mask, g.const([1], np.int64), keepdims=0)
        seqlens_k = g.op("Cast", g.op("Sub", valid, g.const(1, np.int64)), to=ir.DataType.INT32)
        total64 = g.op("Gather", g.op("Shape", attention_mask), g.const(1, np.int64), axis=0)
        total_length = g.op("Cast", total64, to=ir.DataType.INT32)
    with g.scope("model", "rotary_emb"):
        if rope.kind == "longrope":
            is_long = g.op("Greater", total64, g.const(rope.original_max_position_embeddings, np.int64))
            inv_freq = g.op("Where", is_long, g.const(rotary_inv_freq(rope, rope.long_factor)),
                            g.const(rotary_inv_freq(rope, rope.short_factor)))
        else:
            inv_freq = g.const(rotary_inv_freq(rope))
        steps = g.op("Range", g.const(0, np.int64), total64, g.const(1, np.int64))
        pos = g.op("Unsqueeze", g.op("Cast", steps, to=ir.DataType.FLOAT), g.const([1], np.int64))
        freqs = g.op("Mul", pos, g.op("Unsqueeze", inv_freq, g.const([0], np.int64)))
        cos, sin = g.op("Cos", freqs), g.op("Sin", freqs)
        long_factor = rope.long_attention_factor
        if rope.kind == "longrope" and long_factor is not None and long_factor != rope.attention_factor:
            # Phi-3.5-MoE: a different cos/sin factor on each side of the original context.
            factor = g.op("Where", is_long, g.const(long_factor, np.float32),
                          g.const(rope.attention_factor, np.float32))
            cos, sin = g.op("Mul", cos, factor), g.op("Mul", sin, factor)
        elif rope.attention_factor != 1.0:
            factor = g.const(rope.attention_factor, np.float32)
            cos, sin = g.op("Mul", cos, factor), g.op("Mul", sin, factor)
        if dtype != ir.DataType.FLOAT:
            cos, sin = g.op("Cast", cos, to=dtype), g.op("Cast", sin, to=dtype)
    with g.scope("model", "positions"):
        # Where GroupQueryAttention puts token s of row b: a first prompt (no past: total length ==
        # sequence length) is right-padded, so at s; later chunks follow each row's cached tokens, at
        # valid_b - seq_len + s. Used by rotary-as-ops and by masks built from positions; ORT prunes
        # it when nothing reads it.
        seq_len = g.op("Gather", g.op("Shape", input_ids), g.const(1, np.int64), axis=0)
        past = g.op("Where", g.op("Equal", total64, seq_len), g.const([0], np.int64), g.op("Sub", valid, seq_len))
        offsets = g.op("Unsqueeze", g.op("Range", g.const(0, np.int64), seq_len, g.const(1, np.int64)),
                       g.const([0], np.int64))
        positions = g.op("Add", g.op("Unsqueeze", past, g.const([1], np.int64)), offsets)
    return AttentionInputs(seqlens_k, total_length, cos, sin, positions)


def apply_rotary(g: GraphBuilder, x: Value, heads: int, head_dim: int, rotary_dim: int,
                 inputs: AttentionInputs) -> Value:
    """Rotate the first `rotary_dim` channels of each head (non-interleaved, like `rotate_half`)."""
    x4 = g.op("Reshape", x, g.const([0, 0, heads, head_dim], np.int64))
    cos = g.op("Unsqueeze", g.op("Gather", inputs.cos, inputs.positions), g.const([2], np.int64))
    sin = g.op("Unsqueeze", g.op("Gather", inputs.sin, inputs.positions), g.const([2], np.int64))
    half = rotary_dim // 2
    sizes = [half, half] + ([head_dim - rotary_dim] if head_dim > rotary_dim else [])
    parts = g.op("Split", x4, g.const(sizes, np.int64), axis=-1, outputs=len(sizes))
    x1, x2 = parts[0], parts[1]
    rot1 = g.op("Sub", g.op("Mul", x1, cos), g.op("Mul", x2, sin))
    rot2 = g.op("Add", g.op("Mul", x2, cos), g.op("Mul", x1, sin))
    out = g.op("Concat", rot1, rot2, *parts[2:], axis=-1)
    return g.op("Reshape", out, g.const([0, 0, heads * head_dim], np.int64))


def group_query_attention(g: GraphBuilder, qkv: Value, cfg: ModelConfig, inputs: AttentionInputs,
                          past_key: Value, past_value: Value, *, scale: float | None = None,
                          attention_bias: Value | None = None) -> tuple[Value, Value, Value]:
    """ORT GroupQueryAttention over packed QKV, with rotary fused when its kernel allows.

    `scale` multiplies the scores (default 1/sqrt(head_dim); Phi-3-small's muP uses its own);
    `attention_bias` [batch, heads or 1, seq, total] is added to them (Phi-3-small's block-sparse pattern).
    Returns (attention output [batch, seq, heads*head_dim], present key, present value).
    """
    heads, kv_heads, head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    rope = cfg.rope
    fused = gqa_fuses_rotary(rope)
    query, key, value = qkv, None, None
    if not fused:
        q_size, kv_size = heads * head_dim, kv_heads * head_dim
        query, key, value = g.op("Split", qkv, g.const([q_size, kv_size, kv_size], np.int64), axis=-1,
                                 outputs=3)
        if rope.rotary_dim > 0:
            query = apply_rotary(g, query, heads, head_dim, rope.rotary_dim, inputs)
            key = apply_rotary(g, key, kv_heads, head_dim, rope.rotary_dim, inputs)
    # transformers masks keys with kv_idx <= q_idx - sliding_window; ORT's local_window_size with
    # the same number masks the same keys (checked by the sliding-window parity test).
    window = cfg.sliding_window if cfg.sliding_window else -1
    extra = [] if attention_bias is None else [None, attention_bias]  # position_ids (unused), attention_bias
    out, present_key, present_value = g.ms(
        "GroupQueryAttention", query, key, value, past_key, past_value, inputs.seqlens_k, inputs.total_length,
        inputs.cos if fused else None, inputs.sin if fused else None, *extra, outputs=3,
        num_heads=heads, kv_num_heads=kv_heads, do_rotary=int(fused), rotary_interleaved=0,
        scale=float(head_dim**-0.5 if scale is None else scale), local_window_size=window,
    )
    return out, present_key, present_value


def silu_gated(g: GraphBuilder, gate_up: Value, intermediate: int) -> Value:
    """`silu(gate) * up` from a packed [gate | up] projection."""
    gate, up = g.op("Split", gate_up, g.const([intermediate, intermediate], np.int64), axis=-1, outputs=2)
    return g.op("Mul", g.op("Mul", gate, g.op("Sigmoid", gate)), up)


def layer_norm(g: GraphBuilder, x: Value, gamma: Value, beta: Value, eps: float) -> Value:
    """LayerNorm with bias (ONNX LayerNormalization, statistics in fp32).

    Not SkipLayerNormalization: ORT's CPU kernel for it computes the variance in one pass
    (E[x²] - E[x]²), which loses digits when activations sit far from zero. Measured against
    float64 on 64 x 2560 rows offset by 100: LayerNormalization 3.8e-6 (torch fp32 itself 7.8e-6),
    SkipLayerNormalization 1.5e-4; offset by 1000: 2.9e-5 against 1.1e-3.
    """
    return g.op("LayerNormalization", x, gamma, beta, axis=-1, epsilon=eps, stash_type=1)


def residual_sum(g: GraphBuilder, *terms: Value) -> Value:
    """`terms[0] + terms[1] + ...`, added left to right like PyTorch's `a + b + c`, as one Sum node.

    Sum rather than Add because ORT's optimizer fuses an Add whose only consumer is a
    LayerNormalization into SkipLayerNormalization (see `layer_norm` for why we avoid it); it
    leaves Sum alone. ORT's Sum is bitwise equal to `(a + b) + c` in fp32 (checked).
    """
    return g.op("Sum", *terms)


def gelu_tanh(g: GraphBuilder, x: Value) -> Value:
    """GELU with the tanh approximation (transformers' `gelu_new`), as ORT's FastGelu.

    Measured on CPU over [-30, 30]: FastGelu, ONNX Gelu(approximate="tanh") and the formula as
    standard ops all differ from torch's fp32 `gelu_new` by at most 9.5e-7 (torch fp32 against
    float64: 4.3e-7); FastGelu is the one with CPU and CUDA fp16 kernels that ORT fuses biases into.
    """
    return g.ms("FastGelu", x)


def concat_loader(ckpt: Checkpoint, names: Sequence[str],
                  shapes: Sequence[tuple[int, ...]]) -> Callable[[], np.ndarray]:
    """One loader for checkpoint tensors joined along axis 0 (q, k and v → one packed projection).

    The shapes config.json implies are checked now; the tensors are read only when written.
    """
    for name, shape in zip(names, shapes, strict=True):
        actual = ckpt.info(name).shape
        if actual != tuple(shape):
            raise_shape(name, actual, tuple(shape))
    return lambda: np.concatenate([ckpt.read(name) for name in names], axis=0)


def raise_shape(name: str, actual: tuple[int, ...], expected: tuple[int, ...]) -> NoReturn:
    """The error for a checkpoint tensor whose shape disagrees with config.json."""
    raise CheckpointError(f"Tensor {name!r} has shape {actual}, but config.json implies {expected}.",
                          hint="The weights and config.json do not belong together.")
