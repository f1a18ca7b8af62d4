"""Read a Hugging Face config.json in either spelling into one typed description.

Hub checkpoints are written by transformers 4 (`rope_scaling`, `rope_theta`, `partial_rotary_factor`,
`torch_dtype`); transformers 5 writes `rope_parameters` and `dtype`. Each version misreads the
other's files silently, so every key is normalised here, once, and nothing else reads config.json.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from phi_onnx.errors import CheckpointError, UnsupportedModelError


@dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding settings, with LongRoPE's two factor lists when present."""

    theta: float
    rotary_dim: int
    kind: str = "default"  # "default" or "longrope"
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    original_max_position_embeddings: int | None = None
    attention_factor: float = 1.0
    #: LongRoPE's cos/sin factor past the original context when it differs from `attention_factor`
    #: (Phi-3.5-MoE's `long_mscale`); None: the same factor on both sides.
    long_attention_factor: float | None = None


@dataclass(frozen=True)
class ModelConfig:
    """Every shape and setting a builder needs, read from the checkpoint's config."""

    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm_eps: float
    hidden_act: str
    max_position_embeddings: int
    rope: RopeConfig
    sliding_window: int | None
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None
    source_dtype: str
    raw: dict[str, Any] = field(repr=False, compare=False, default_factory=dict)
    #: Mixture of experts (Phi-3.5-MoE): experts per layer, experts per token, the sparse mixer's
    #: jitter epsilon (its routing threshold in eval mode). 0 for dense models.
    num_experts: int = 0
    experts_per_token: int = 0
    router_jitter_noise: float = 0.0


def load_config(folder: Path) -> ModelConfig:
    """Read `config.json` (and `generation_config.json` for EOS ids) from a checkpoint folder."""
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder} has no config.json.",
                              hint="Pass the folder a Hugging Face model was saved to (save_pretrained).")
    raw = _read_json(path)
    generation = folder / "generation_config.json"
    gen = _read_json(generation) if generation.is_file() else {}
    return parse_config(raw, gen)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON ({error}).",
                              hint="Re-download or re-save the checkpoint.") from error
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} does not hold a JSON object.", hint="Re-download the checkpoint.")
    return data


def parse_config(raw: dict[str, Any], generation: dict[str, Any] | None = None) -> ModelConfig:
    """Normalise a config dict (either transformers spelling) into a ModelConfig."""
    architectures = raw.get("architectures") or []
    if not architectures:
        raise CheckpointError("config.json names no architecture (`architectures` is missing).",
                              hint="Add e.g. \"architectures\": [\"Phi3ForCausalLM\"] to config.json.")
    try:
        hidden = int(raw["hidden_size"])
        heads = int(raw["num_attention_heads"])
        layers = int(raw["num_hidden_layers"])
        vocab = int(raw["vocab_size"])
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"config.json lacks a required size: {error}.",
                              hint="The file looks incomplete; re-download or re-save the checkpoint.") from error
    kv_heads = int(raw.get("num_key_value_heads") or heads)
    head_dim = int(raw.get("head_dim") or hidden // heads)
    if heads % kv_heads:
        raise CheckpointError(f"num_attention_heads ({heads}) is not a multiple of num_key_value_heads "
                              f"({kv_heads}).", hint="The config is inconsistent.")
    max_pos = int(raw.get("max_position_embeddings") or 4096)
    generation = generation or {}
    # generation_config.json lists every stop id (Phi-3: <|endoftext|>, <|assistant|>, <|end|>) and is
    # what transformers' generate uses; config.json usually names just one.
    eos = token_ids(generation.get("eos_token_id")) or token_ids(raw.get("eos_token_id"))
    return ModelConfig(
        architecture=str(architectures[0]),
        model_type=str(raw.get("model_type", "")),
        vocab_size=vocab,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=int(raw.get("intermediate_size") or 4 * hidden),
        norm_eps=float(raw.get("rms_norm_eps") or raw.get("layer_norm_eps") or 1e-5),
        hidden_act=str(raw.get("hidden_act", "silu")),
        max_position_embeddings=max_pos,
        rope=_rope(raw, head_dim, max_pos),
        sliding_window=_sliding_window(raw, max_pos),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        bos_token_id=_first(generation.get("bos_token_id"), raw.get("bos_token_id")),
        eos_token_ids=tuple(dict.fromkeys(eos)),
        pad_token_id=_first(generation.get("pad_token_id"), raw.get("pad_token_id")),
        source_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "float32"),
        raw=raw,
        num_experts=int(raw.get("num_local_experts") or 0),
        experts_per_token=int(raw.get("num_experts_per_tok") or 0),
        router_jitter_noise=float(raw.get("router_jitter_noise") or 0.0),
    )


def token_ids(value: Any) -> list[int]:
    """A token id field (absent, one int, or a list) as a list."""
    if value is None:
        return []
    if isinstance(value, list):
        return [int(v) for v in value]
    return [int(value)]


def _first(*values: Any) -> int | None:
    for value in values:
        ids = token_ids(value)
        if ids:
            return ids[0]
    return None


def _sliding_window(raw: dict[str, Any], max_pos: int) -> int | None:
    window = raw.get("sliding_window")
    if window is None or raw.get("use_sliding_window") is False:
        return None
    window = int(window)
    # A window that covers the whole context masks nothing.
    return None if window >= max_pos else window


def _rope(raw: dict[str, Any], head_dim: int, max_pos: int) -> RopeConfig:
    """Merge transformers-5 `rope_parameters` over transformers-4 top-level keys and `rope_scaling`."""
    params: dict[str, Any] = {}
    scaling = raw.get("rope_scaling")
    if isinstance(scaling, dict):
        params.update(scaling)
    new = raw.get("rope_parameters")
    if isinstance(new, dict):
        params.update(new)
    theta = float(params.get("rope_theta") or raw.get("rope_theta") or 10000.0)
    partial = float(params.get("partial_rotary_factor") or raw.get("partial_rotary_factor") or 1.0)
    rotary_dim = int(head_dim * partial)
    kind = str(params.get("rope_type") or params.get("type") or "default")
    if kind == "su":  # the name early Phi-3 128k configs used for LongRoPE
        kind = "longrope"
    if kind == "default":
        return RopeConfig(theta=theta, rotary_dim=rotary_dim)
    if kind != "longrope":
        raise UnsupportedModelError(f"RoPE scaling type {kind!r} is not supported.",
                                    hint="Phi checkpoints use the default rotary or 'longrope'.")
    original = int(params.get("original_max_position_embeddings")
                   or raw.get("original_max_position_embeddings") or max_pos)
    short = tuple(float(x) for x in params.get("short_factor") or ())
    long = tuple(float(x) for x in params.get("long_factor") or ())
    if len(short) != rotary_dim // 2 or len(long) != rotary_dim // 2:
        raise CheckpointError(
            f"LongRoPE factor lists have lengths {len(short)} (short) and {len(long)} (long); "
            f"rotary dimension {rotary_dim} needs {rotary_dim // 2} each.",
            hint="The config's rope_scaling/rope_parameters block is inconsistent with head_dim.")
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        factor = params.get("factor") or max_pos / original
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    long_attention_factor = None
    if raw.get("model_type") == "phimoe" and params.get("short_mscale") is not None:
        # Phi-3.5-MoE scales cos/sin by short_mscale up to the original context and long_mscale past
        # it, in place of the attention factor above (transformers' PhimoeRotaryEmbedding; the hub's
        # 1.2432 differs from the sqrt(1 + ln 32 / ln 4096) = 1.1902 the formula gives).
        attention_factor = params["short_mscale"]
        long_attention_factor = float(params.get("long_mscale") or attention_factor)
    return RopeConfig(theta=theta, rotary_dim=rotary_dim, kind="longrope", short_factor=short,
                      long_factor=long, original_max_position_embeddings=original,
                      attention_factor=float(attention_factor), long_attention_factor=long_attention_factor)
