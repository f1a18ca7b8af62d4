"""config.json in transformers-4 (hub) and transformers-5 spellings reads the same."""

from __future__ import annotations

import json
import math

import pytest

from phi_onnx.errors import CheckpointError, UnsupportedModelError
from phi_onnx.source.config import load_config, parse_config

SHORT = [1.0 + 0.01 * i for i in range(48)]
LONG = [1.0 + 0.1 * i for i in range(48)]

# A Phi-4-mini-style config as the hub stores it (transformers-4 keys).
HUB_STYLE = {
    "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "hidden_size": 3072, "num_attention_heads": 24,
    "num_key_value_heads": 8, "num_hidden_layers": 32, "intermediate_size": 8192, "vocab_size": 200064,
    "max_position_embeddings": 131072, "original_max_position_embeddings": 4096, "rope_theta": 10000.0,
    "partial_rotary_factor": 0.75, "rope_scaling": {"type": "longrope", "short_factor": SHORT, "long_factor": LONG},
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "sliding_window": 262144, "rms_norm_eps": 1e-5,
    "eos_token_id": 199999,
}


def test_transformers5_file_reads_like_the_hub_file(tmp_path):
    from transformers import Phi3Config

    # transformers 5 converts the old keys into rope_parameters/dtype when it saves.
    Phi3Config(**HUB_STYLE).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" in saved and "rope_scaling" not in saved
    new, old = load_config(tmp_path), parse_config(HUB_STYLE)
    assert new.rope == old.rope
    assert old.rope.rotary_dim == 96 and old.rope.kind == "longrope"
    assert old.rope.original_max_position_embeddings == 4096
    assert old.rope.attention_factor == pytest.approx(math.sqrt(1 + math.log(32) / math.log(4096)))
    assert (new.head_dim, new.num_kv_heads, new.tie_word_embeddings) == (128, 8, True)
    assert old.source_dtype == "bfloat16" and new.source_dtype == "bfloat16"
    assert old.sliding_window is None  # a window wider than the context masks nothing


def test_partial_rotary_read_from_rope_parameters():
    """transformers 4.57 read a 5.x Phi-2 config's 0.4 as the default 0.5; we must not."""
    raw = {**HUB_STYLE, "rope_scaling": None, "partial_rotary_factor": None,
           "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.4}}
    assert parse_config(raw).rope.rotary_dim == int(128 * 0.4)


def test_old_su_name_is_longrope():
    raw = {**HUB_STYLE, "rope_scaling": {"type": "su", "short_factor": SHORT, "long_factor": LONG}}
    assert parse_config(raw).rope.kind == "longrope"


def test_eos_ids_from_generation_config():
    cfg = parse_config(HUB_STYLE, {"eos_token_id": [199999, 200020]})
    assert cfg.eos_token_ids == (199999, 200020)
    assert parse_config(HUB_STYLE).eos_token_ids == (199999,)


def test_sliding_window_kept_when_inside_context():
    cfg = parse_config({**HUB_STYLE, "max_position_embeddings": 4096, "rope_scaling": None,
                        "sliding_window": 2047})
    assert cfg.sliding_window == 2047


def test_unsupported_rope_type():
    with pytest.raises(UnsupportedModelError, match="'yarn' is not supported"):
        parse_config({**HUB_STYLE, "rope_scaling": {"type": "yarn", "factor": 4.0}})


def test_inconsistent_longrope_factors():
    with pytest.raises(CheckpointError, match="needs 48 each"):
        parse_config({**HUB_STYLE, "rope_scaling": {"type": "longrope", "short_factor": SHORT[:10],
                                                    "long_factor": LONG}})


def test_malformed_config_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="is not valid JSON"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Phi3ForCausalLM"]}))
    with pytest.raises(CheckpointError, match="lacks a required size"):
        load_config(tmp_path)
