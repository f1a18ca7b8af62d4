"""Read a Hugging Face config.json in either spelling into one typed description.

Hub checkpoints are written by transformers 4 (`rope_scaling`, `rope_theta`, `partial_rotary_factor`,
`torch_dtype`); transformers 5 writes `rope_parameters` and `dtype`. Each version misreads the
other's files silently, so every key is normalised here, once, and nothing else reads config.json.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from phi_onnx.errors import CheckpointError, UnsupportedModelError
from phi_onnx.jsonfile import read_json_object

_HINT = "Fix config.json, or re-download or re-save the checkpoint."
#: Far beyond any real model (Phi-4: hidden 5120, 40 layers, 40 heads, vocab 100352, 16k context), so
#: only a corrupt or hostile file reaches them; they stop a huge number before anything is allocated.
_MAX_WIDTH = 1 << 17
_MAX_HEADS = 1 << 12
_MAX_LAYERS = 1 << 12
_MAX_VOCAB = 1 << 24
_MAX_POSITIONS = 1 << 24
_MAX_EXPERTS = 1 << 12
#: `model.layers.N.` (and the other families' spellings of the same counter).
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")


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
    #: The file as read, for the family normalisers in phi_onnx/source/ only: builders read the fields.
    raw: dict[str, Any] = field(repr=False, compare=False, default_factory=dict)
    #: Mixture of experts (Phi-3.5-MoE): experts per layer, experts per token, the sparse mixer's
    #: jitter epsilon (its routing threshold in eval mode). 0 for dense models.
    num_experts: int = 0
    experts_per_token: int = 0
    router_jitter_noise: float = 0.0
    #: Phi-1/1.5/2's LayerNorm on queries and keys (no released checkpoint sets it; the builder refuses it).
    qk_layernorm: bool = False
    #: A family's own settings, from its normaliser (Phi-3-small: `source.phi3small.Phi3SmallSettings`).
    family: Any = field(default=None, compare=False)


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
    return read_json_object(path, CheckpointError, "Re-download or re-save the checkpoint.",
                            "Re-download the checkpoint.")


def parse_config(raw: dict[str, Any], generation: dict[str, Any] | None = None) -> ModelConfig:
    """Normalise a config dict (either transformers spelling) into a ModelConfig.

    Every field is type- and range-checked here, once: a string where a number belongs, a count of zero or
    an absurd size is an error naming the field, never silently converted.

    Raises:
        CheckpointError: a field is missing, of the wrong JSON type, or out of range.
        UnsupportedModelError: a setting phi-onnx does not implement (e.g. a RoPE scaling type).
    """
    if not isinstance(raw, dict):
        raise CheckpointError("config.json does not hold a JSON object.", hint=_HINT)
    architectures = raw.get("architectures")
    if architectures is None or architectures == []:
        raise CheckpointError("config.json names no architecture (`architectures` is missing).",
                              hint="Add e.g. \"architectures\": [\"Phi3ForCausalLM\"] to config.json.")
    if not isinstance(architectures, list) or not all(isinstance(a, str) and a for a in architectures):
        raise CheckpointError(f"config.json: `architectures` must be a list of class names, not {architectures!r}.",
                              hint="For example \"architectures\": [\"Phi3ForCausalLM\"].")
    hidden = _int(raw, "hidden_size", maximum=_MAX_WIDTH)
    heads = _int(raw, "num_attention_heads", maximum=_MAX_HEADS)
    layers = _int(raw, "num_hidden_layers", maximum=_MAX_LAYERS)
    vocab = _int(raw, "vocab_size", maximum=_MAX_VOCAB)
    kv_heads = _int(raw, "num_key_value_heads", heads, maximum=heads)
    head_dim = _int(raw, "head_dim", max(hidden // heads, 1), maximum=_MAX_WIDTH)
    if heads % kv_heads:
        raise CheckpointError(f"num_attention_heads ({heads}) is not a multiple of num_key_value_heads "
                              f"({kv_heads}).", hint="The config is inconsistent.")
    max_pos = _int(raw, "max_position_embeddings", 4096, maximum=_MAX_POSITIONS)
    if not isinstance(generation, (dict, type(None))):
        raise CheckpointError("generation_config.json does not hold a JSON object.", hint=_HINT)
    generation = generation or {}
    # generation_config.json lists every stop id (Phi-3: <|endoftext|>, <|assistant|>, <|end|>) and is
    # what transformers' generate uses; config.json usually names just one.
    eos = token_ids(generation.get("eos_token_id")) or token_ids(raw.get("eos_token_id"))
    eps_key = "rms_norm_eps" if raw.get("rms_norm_eps") is not None else "layer_norm_eps"
    config = ModelConfig(
        architecture=str(architectures[0]),
        model_type=_str(raw, "model_type", ""),
        vocab_size=vocab,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=_int(raw, "intermediate_size", 4 * hidden, maximum=_MAX_WIDTH * 16),
        norm_eps=_float(raw, eps_key, 1e-5, low=0.0, high=1.0),
        hidden_act=_str(raw, "hidden_act", "silu"),
        max_position_embeddings=max_pos,
        rope=_rope(raw, head_dim, max_pos),
        sliding_window=_sliding_window(raw, max_pos),
        tie_word_embeddings=_bool(raw, "tie_word_embeddings", False),
        bos_token_id=_first(generation.get("bos_token_id"), raw.get("bos_token_id")),
        eos_token_ids=tuple(dict.fromkeys(eos)),
        pad_token_id=_first(generation.get("pad_token_id"), raw.get("pad_token_id")),
        source_dtype=_str(raw, "torch_dtype" if raw.get("torch_dtype") is not None else "dtype", "float32"),
        raw=raw,
        num_experts=_int(raw, "num_local_experts", 0, minimum=0, maximum=_MAX_EXPERTS),
        experts_per_token=_int(raw, "num_experts_per_tok", 0, minimum=0, maximum=_MAX_EXPERTS),
        router_jitter_noise=_float(raw, "router_jitter_noise", 0.0, low=0.0, high=1.0, inclusive=True),
        qk_layernorm=_bool(raw, "qk_layernorm", False),
    )
    if config.architecture == "Phi3SmallForCausalLM":  # its own spellings: source/phi3small.py
        from phi_onnx.source.phi3small import normalise

        return normalise(config)
    return config


def token_ids(value: Any) -> list[int]:
    """A token id field (absent, one int, or a list) as a list.

    Raises:
        CheckpointError: an id that is not a non-negative whole number.
    """
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    for item in values:
        if isinstance(item, bool) or not isinstance(item, int) or item < 0:
            raise CheckpointError(f"Token id {item!r} is not a non-negative whole number.",
                                  hint="Fix the eos/bos/pad token ids in config.json or generation_config.json.")
    return list(values)


def check_tensors(config: ModelConfig, names: Iterable[str]) -> None:
    """Refuse a config whose layer count exceeds the layers the checkpoint holds weights for.

    Runs before anything is built: a `num_hidden_layers` of 10**12 must fail here, not after the graph
    builder has grown by a layer at a time.
    """
    found = {int(match[1]) for name in names if (match := _LAYER.search(name))}
    present = max(found) + 1 if found else 0
    if config.num_layers > present:
        raise CheckpointError(
            f"config.json says num_hidden_layers is {config.num_layers}, but the checkpoint holds weights for "
            f"{present} layer{'s' if present != 1 else ''}.",
            hint="Fix num_hidden_layers in config.json, or add the missing shards.")


def _int(raw: dict[str, Any], key: str, default: int | None = None, *, minimum: int = 1, maximum: int) -> int:
    """A whole-number field; `default` when absent or null (required when `default` is None)."""
    value = raw.get(key)
    if value is None:
        if default is None:
            raise CheckpointError(f"config.json lacks a required size: {key!r}.", hint=_HINT)
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # 4096.0: JSON writers that know one number type
    if isinstance(value, bool) or not isinstance(value, int):
        raise CheckpointError(f"config.json: {key} must be a whole number, not {value!r}.", hint=_HINT)
    if not minimum <= value <= maximum:
        raise CheckpointError(f"config.json: {key} is {value}; it must be from {minimum} to {maximum}.", hint=_HINT)
    return value


def _float(raw: dict[str, Any], key: str, default: float, *, low: float, high: float,
           inclusive: bool = False) -> float:
    """A number field in (low, high] (or [low, high] when `inclusive`); `default` when absent or null."""
    value = raw.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CheckpointError(f"config.json: {key} must be a number, not {value!r}.", hint=_HINT)
    if not (low <= value if inclusive else low < value) or value > high:
        raise CheckpointError(f"config.json: {key} is {value}; it must be {'from' if inclusive else 'above'} {low} "
                              f"{'to' if inclusive else 'and at most'} {high}.", hint=_HINT)
    return float(value)


def _str(raw: dict[str, Any], key: str, default: str) -> str:
    value = raw.get(key)
    if value is None:
        return default
    if not isinstance(value, str):
        raise CheckpointError(f"config.json: {key} must be a string, not {value!r}.", hint=_HINT)
    return value


def _bool(raw: dict[str, Any], key: str, default: bool) -> bool:
    value = raw.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise CheckpointError(f"config.json: {key} must be true or false, not {value!r}.", hint=_HINT)
    return value


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
    window = _int(raw, "sliding_window", maximum=_MAX_POSITIONS * 16)
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
    # rope_parameters' keys win over the top-level transformers-4 ones, unless they are null
    merged = {**raw, **{key: value for key, value in params.items() if value is not None}}
    theta = _float(merged, "rope_theta", 10000.0, low=0.0, high=1e12)
    partial = _float(merged, "partial_rotary_factor", 1.0, low=0.0, high=1.0)
    rotary_dim = int(head_dim * partial)
    kind = _str(params, "rope_type" if params.get("rope_type") is not None else "type", "default")
    if kind == "su":  # the name early Phi-3 128k configs used for LongRoPE
        kind = "longrope"
    if kind == "default":
        return RopeConfig(theta=theta, rotary_dim=rotary_dim)
    if kind != "longrope":
        raise UnsupportedModelError(f"RoPE scaling type {kind!r} is not supported.",
                                    hint="Phi checkpoints use the default rotary or 'longrope'.")
    original = _int(merged, "original_max_position_embeddings", max_pos, maximum=_MAX_POSITIONS)
    short, long = _factors(params, "short_factor"), _factors(params, "long_factor")
    if len(short) != rotary_dim // 2 or len(long) != rotary_dim // 2:
        raise CheckpointError(
            f"LongRoPE factor lists have lengths {len(short)} (short) and {len(long)} (long); "
            f"rotary dimension {rotary_dim} needs {rotary_dim // 2} each.",
            hint="The config's rope_scaling/rope_parameters block is inconsistent with head_dim.")
    attention_factor: float | None = params.get("attention_factor")
    if attention_factor is not None:
        attention_factor = _float(params, "attention_factor", 1.0, low=0.0, high=1e3)
    else:
        factor = _float(params, "factor", max_pos / original, low=0.0, high=1e6) if params.get("factor") else \
            max_pos / original
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    long_attention_factor = None
    if raw.get("model_type") == "phimoe" and params.get("short_mscale") is not None:
        # Phi-3.5-MoE scales cos/sin by short_mscale up to the original context and long_mscale past
        # it, in place of the attention factor above (transformers' PhimoeRotaryEmbedding; the hub's
        # 1.2432 differs from the sqrt(1 + ln 32 / ln 4096) = 1.1902 the formula gives).
        attention_factor = _float(params, "short_mscale", 1.0, low=0.0, high=1e3)
        long_attention_factor = _float(params, "long_mscale", attention_factor, low=0.0, high=1e3)
    return RopeConfig(theta=theta, rotary_dim=rotary_dim, kind="longrope", short_factor=short,
                      long_factor=long, original_max_position_embeddings=original,
                      attention_factor=float(attention_factor), long_attention_factor=long_attention_factor)


def _factors(params: dict[str, Any], key: str) -> tuple[float, ...]:
    value = params.get(key) or ()
    if not isinstance(value, (list, tuple)) or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in value):
        raise CheckpointError(f"config.json: LongRoPE's {key} must be a list of numbers.", hint=_HINT)
    return tuple(float(x) for x in value)
