"""config.json in transformers-4 (hub) and transformers-5 spellings reads the same."""

from __future__ import annotations

import copy
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
    Phi3Config(**copy.deepcopy(HUB_STYLE)).save_pretrained(tmp_path)  # it edits rope_scaling in place
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


@pytest.mark.parametrize(("change", "message"), [
    ({"num_hidden_layers": 0}, "num_hidden_layers is 0; it must be from 1"),
    ({"num_hidden_layers": -3}, "num_hidden_layers is -3"),
    ({"num_hidden_layers": 10**12}, "num_hidden_layers is 1000000000000"),
    ({"num_attention_heads": 0}, "num_attention_heads is 0"),
    ({"num_key_value_heads": 0}, "num_key_value_heads is 0"),
    ({"num_key_value_heads": 48}, "num_key_value_heads is 48; it must be from 1 to 24"),
    ({"architectures": 5}, "`architectures` must be a list of class names, not 5"),
    ({"architectures": [7]}, "`architectures` must be a list"),
    ({"max_position_embeddings": "4096"}, "max_position_embeddings must be a whole number, not '4096'"),
    ({"rms_norm_eps": "1e-5"}, "rms_norm_eps must be a number, not '1e-5'"),
    ({"rms_norm_eps": 0}, "rms_norm_eps is 0"),
    ({"hidden_size": "256"}, "hidden_size must be a whole number, not '256'"),
    ({"hidden_size": 256.5}, "hidden_size must be a whole number"),
    ({"hidden_size": True}, "hidden_size must be a whole number"),
    ({"vocab_size": None}, "lacks a required size: 'vocab_size'"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings must be true or false"),
    ({"hidden_act": 3}, "hidden_act must be a string"),
    ({"eos_token_id": "199999"}, "Token id '199999'"),
    ({"eos_token_id": [1, -1]}, "Token id -1"),
    ({"rope_scaling": None, "rope_parameters": {"rope_type": "default", "rope_theta": "1e4"}},
     "rope_theta must be a number"),
    ({"partial_rotary_factor": 2}, "partial_rotary_factor is 2"),
    ({"sliding_window": "2047", "max_position_embeddings": 4096}, "sliding_window must be a whole number"),
    ({"rope_scaling": {"type": "longrope", "short_factor": ["a"] * 48, "long_factor": LONG}}, "list of numbers"),
    ({"rope_scaling": {"type": "longrope", "short_factor": SHORT, "long_factor": LONG, "attention_factor": "x"}},
     "attention_factor must be a number"),
])
def test_wrong_values_are_refused_naming_the_field(change, message):
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace("[", r"\[")):
        parse_config({**HUB_STYLE, **change})


def test_integral_floats_are_read_as_sizes():
    assert parse_config({**HUB_STYLE, "hidden_size": 3072.0}).hidden_size == 3072


def test_layer_count_is_checked_against_the_tensors_before_building(tmp_path, make_checkpoint, monkeypatch):
    import shutil
    import tracemalloc

    from phi_onnx.export import export

    ckpt = tmp_path / "ckpt"
    shutil.copytree(make_checkpoint("phi3-mha"), ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    layers = config["num_hidden_layers"]
    for count in (layers + 1, 4096):
        config["num_hidden_layers"] = count
        (ckpt / "config.json").write_text(json.dumps(config))
        tracemalloc.start()
        with pytest.raises(CheckpointError, match=f"num_hidden_layers is {count}, but the checkpoint holds "
                                                  f"weights for {layers} layers"):
            export(ckpt, tmp_path / "out")
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 50 * 2**20, peak  # refused before a graph of `count` layers was started
    assert not (tmp_path / "out").exists()
