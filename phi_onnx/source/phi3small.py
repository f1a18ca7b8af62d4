"""Phi-3-small's config.json keys (`Phi3SmallForCausalLM`), normalised like every other family's.

`source/config.py` reads the keys all families share and hands Phi-3-small configs to `normalise`, so the
builder (export/phi3small.py, whose FACTS section says where each key's meaning comes from) never reads
config.json itself: it gets the generic `ModelConfig` with this family's spellings applied (rope base,
LayerNorm eps, MLP width, tied embeddings) and `cfg.family`, a `Phi3SmallSettings`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from phi_onnx.errors import CheckpointError, UnsupportedModelError
from phi_onnx.source.config import ModelConfig, RopeConfig

#: Vocabulary size of the Phi-3-small tokenizer (cl100k_base padded to a multiple of 64).
VOCAB_SIZE = 100352
#: Ids the Phi-3-small tokenizer never produces; their logits are masked (see FACTS).
DUMMY_TOKEN_IDS: tuple[int, ...] = (100256, 100258, 100259, 100260, 100264, 100265, *range(100267, 100352))


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


def normalise(cfg: ModelConfig) -> ModelConfig:
    """`cfg` with Phi-3-small's spellings applied and its own settings in `family`."""
    settings = read_settings(cfg)  # first: it refuses activations this family cannot build
    return dataclasses.replace(model_config(cfg), family=settings)
