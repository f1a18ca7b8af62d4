"""A small PyTorch Phi-3-small, written from the architecture facts (see phi_onnx/export/phi3small.py FACTS).

It reads the checkpoint's tensors by their hub names and config.json in the hub spelling, and
computes full-sequence fp32 logits with explicit masks: nothing here is shared with the exporter.
Sources of each fact: the hub's modeling_phi3_small.py / positional_embedding.py /
triton_flash_blocksparse_attn.py / tokenization_phi3_small.py, cross-checked against vLLM's
phi3_small.py and blocksparse utils, and mlx-lm's phi3small.py.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


def block_sparse_mask(heads: int, length: int, block: int, local: int, stride: int, homo: bool) -> torch.Tensor:
    """[heads, length, length] bool: the hub's per-head block pattern expanded to tokens, made causal."""
    n = -(-length // block)
    q = torch.arange(n)[:, None]
    k = torch.arange(n)[None, :]
    step = 0 if homo else max(1, int(stride / heads))
    masks = []
    for h in range(heads):
        vertical = (torch.arange(n) + h * step + 1) % stride == 0
        blocks = (q >= k) & ((q - k < local) | vertical[None, :])
        dense = torch.kron(blocks.int(), torch.ones(block, block, dtype=torch.int))[:length, :length].bool()
        masks.append(dense & torch.ones(length, length, dtype=torch.bool).tril())
    return torch.stack(masks)


def rotary(cfg: dict[str, Any], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [length, head_dim] for positions 0..length-1, the hub's RotaryEmbedding rules."""
    d = cfg["hidden_size"] // cfg["num_attention_heads"]
    base = cfg.get("rope_embedding_base", 1e6)
    exponent = torch.arange(0, d, 2).float() / d
    scaling = cfg.get("rope_scaling")
    if scaling:
        original = scaling["original_max_position_embeddings"]
        if length > original:
            factors = torch.tensor(scaling["long_factor"], dtype=torch.float32)
            mscale = scaling.get("long_mscale", -1) or -1
            if mscale <= 0:
                ratio = cfg["max_position_embeddings"] / original
                mscale = 1.0 if ratio <= 1 else math.sqrt(1 + math.log(ratio) / math.log(original))
        else:
            factors = torch.tensor(scaling["short_factor"], dtype=torch.float32)
            mscale = scaling.get("short_mscale", -1) or -1
            mscale = mscale if mscale > 0 else 1.0
        inv_freq = 1.0 / (factors * base ** exponent)
        t = torch.arange(length, dtype=torch.float32)
    else:
        inv_freq = 1.0 / (base ** exponent)
        t = torch.arange(length, dtype=torch.float32) * cfg.get("rope_position_scale", 1.0)
        mscale = 1.0
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * mscale, emb.sin() * mscale


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def gegelu(u: torch.Tensor, limit: float | None) -> torch.Tensor:
    """Even columns through quick_gelu, odd columns + 1, finite values clamped to the limit."""
    a, lin = u[..., 0::2], u[..., 1::2]
    if limit is not None:
        a = torch.where(torch.isinf(a), a, a.clamp(max=limit))
        lin = torch.where(torch.isinf(lin), lin, lin.clamp(-limit, limit))
    return a * torch.sigmoid(1.702 * a) * (lin + 1)


def is_dense(cfg: dict[str, Any], layer: int) -> bool:
    n = cfg.get("dense_attention_every_n_layers")
    return bool(n) and (layer + 1) % n == 0


def forward(cfg: dict[str, Any], w: dict[str, torch.Tensor], ids: np.ndarray,
            lm_head: torch.Tensor | None = None, *, train: bool = False) -> Any:
    """fp32 logits [batch, seq, vocab] for `ids` (no cache, no padding).

    `lm_head` replaces the tied embedding matrix in the LM head only (the int4 test passes the
    quantization round trip of the embedding there). With `train`, gradients flow and the logits
    come back as a tensor (the int4 quality test trains this model).
    """
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hidden = cfg["hidden_size"]
    d, per = hidden // heads, heads // kv
    eps = cfg.get("layer_norm_epsilon", 1e-5)
    scale = cfg.get("mup_attn_multiplier", 1.0) / d if cfg.get("mup_use_scaling", True) else d ** -0.5
    tokens = torch.from_numpy(ids)
    b, s = tokens.shape
    with torch.set_grad_enabled(train):
        x = w["model.embed_tokens.weight"][tokens]
        if cfg.get("mup_embedding_multiplier"):
            x = x * cfg["mup_embedding_multiplier"]
        cos, sin = rotary(cfg, s)
        causal = torch.ones(s, s, dtype=torch.bool).tril().expand(heads, s, s)
        sparse = block_sparse_mask(heads, s, cfg["blocksparse_block_size"], cfg["blocksparse_num_local_blocks"],
                                   cfg["blocksparse_vert_stride"], cfg.get("blocksparse_homo_head_pattern", False))
        for i in range(cfg["num_hidden_layers"]):
            p = f"model.layers.{i}."
            h = F.layer_norm(x, (hidden,), w[p + "input_layernorm.weight"], w[p + "input_layernorm.bias"], eps)
            qkv = F.linear(h, w[p + "self_attn.query_key_value.weight"], w[p + "self_attn.query_key_value.bias"])
            qkv = qkv.view(b, s, kv, per + 2, d)
            q = qkv[:, :, :, :per].reshape(b, s, heads, d).transpose(1, 2)
            k = qkv[:, :, :, per].transpose(1, 2)
            v = qkv[:, :, :, per + 1].transpose(1, 2)
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
            k, v = k.repeat_interleave(per, dim=1), v.repeat_interleave(per, dim=1)
            scores = (q @ k.transpose(-1, -2)) * scale
            mask = causal if is_dense(cfg, i) else sparse
            scores = scores.masked_fill(~mask, float("-inf"))
            out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, hidden)
            x = x + F.linear(out, w[p + "self_attn.dense.weight"], w[p + "self_attn.dense.bias"])
            h = F.layer_norm(x, (hidden,), w[p + "post_attention_layernorm.weight"],
                             w[p + "post_attention_layernorm.bias"], eps)
            up = F.linear(h, w[p + "mlp.up_proj.weight"], w[p + "mlp.up_proj.bias"])
            x = x + F.linear(gegelu(up, cfg.get("gegelu_limit")), w[p + "mlp.down_proj.weight"],
                             w[p + "mlp.down_proj.bias"])
        x = F.layer_norm(x, (hidden,), w["model.final_layernorm.weight"], w["model.final_layernorm.bias"], eps)
        logits = F.linear(x, w["model.embed_tokens.weight"] if lm_head is None else lm_head)
        if cfg.get("mup_width_multiplier"):
            logits = logits / cfg["mup_width_multiplier"]
        dummies = cfg.get("dummy_token_indices") or []
        if dummies:
            mask = torch.zeros(cfg["vocab_size"], dtype=torch.bool)
            mask[dummies] = True
            logits = logits.masked_fill(mask, torch.finfo(torch.float32).min)
    return logits if train else logits.numpy()


def random_weights(cfg: dict[str, Any], seed: int) -> dict[str, torch.Tensor]:
    """Random tensors with the hub names and shapes (std chosen so attention is far from uniform)."""
    g = torch.Generator().manual_seed(seed)
    heads, kv, hidden = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["hidden_size"]
    d = hidden // heads
    inter = cfg["ff_intermediate_size"]

    def rnd(*shape: int, std: float = 0.1, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std + mean

    w = {"model.embed_tokens.weight": rnd(cfg["vocab_size"], hidden, std=0.3),
         "model.final_layernorm.weight": rnd(hidden, mean=1.0), "model.final_layernorm.bias": rnd(hidden)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            w[p + norm + ".weight"], w[p + norm + ".bias"] = rnd(hidden, mean=1.0), rnd(hidden)
        w[p + "self_attn.query_key_value.weight"] = rnd((heads + 2 * kv) * d, hidden, std=0.15)
        w[p + "self_attn.query_key_value.bias"] = rnd((heads + 2 * kv) * d)
        w[p + "self_attn.dense.weight"], w[p + "self_attn.dense.bias"] = rnd(hidden, hidden), rnd(hidden)
        w[p + "mlp.up_proj.weight"], w[p + "mlp.up_proj.bias"] = rnd(2 * inter, hidden), rnd(2 * inter)
        w[p + "mlp.down_proj.weight"], w[p + "mlp.down_proj.bias"] = rnd(hidden, inter), rnd(hidden)
    return w
