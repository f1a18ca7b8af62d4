"""Property-based fuzzing of the parsers that read outside input: any input gives a result or the
project's own error (PhiOnnxError), never another exception."""

from __future__ import annotations

import contextlib
import itertools
import json
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from phi_onnx.errors import PhiOnnxError
from phi_onnx.source.checkpoint import TensorInfo, parse_header
from phi_onnx.source.config import ModelConfig, check_tensors, parse_config

FUZZ = settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

json_scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=8)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
small_ints = st.integers(-4, 2**20) | st.sampled_from([0, 2**63, -(2**63), 10**12])


ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I16": 2, "I64": 8, "U8": 1, "BOOL": 1}


@st.composite
def headers(draw: st.DrawFn) -> tuple[object, int]:
    """A consistent header (tensors laid end to end) and its data size, then maybe one thing broken."""
    header: dict[str, object] = {}
    offset = 0
    for index in range(draw(st.integers(0, 4))):
        dtype = draw(st.sampled_from(sorted(ITEMSIZE)))
        shape = draw(st.lists(st.integers(0, 6), max_size=3))
        size = ITEMSIZE[dtype]
        for dim in shape:
            size *= dim
        header[f"t{index}"] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.just({"format": "pt"}) | json_values)
    data_size = offset + draw(st.integers(0, 16))
    names = [name for name in header if name != "__metadata__"]
    mutation = draw(st.sampled_from(["none", "field", "shift", "entry", "size", "dtype"]))
    if names and mutation != "none":
        name = draw(st.sampled_from(names))
        entry = header[name]
        assert isinstance(entry, dict)
        if mutation == "field":
            entry[draw(st.sampled_from(["dtype", "shape", "data_offsets"]))] = draw(json_values)
        elif mutation == "shift":  # overlaps, negative offsets, past the end
            delta = draw(st.integers(-64, 64))
            entry["data_offsets"] = [x + delta for x in entry["data_offsets"]]
        elif mutation == "entry":
            header[name] = draw(json_values)
        elif mutation == "size":
            data_size = draw(st.integers(0, data_size))
        else:
            entry["dtype"] = draw(st.sampled_from(["F4", "I4", "", "f32", "F8_E4M3"]) | json_scalars)
    return header, data_size


def _check_header(raw: bytes, data_size: int) -> None:
    try:
        tensors = parse_header(raw, Path("fuzz.safetensors"), 8 + len(raw) + data_size)
    except PhiOnnxError:
        return
    ends = []
    for info in tensors.values():
        assert isinstance(info, TensorInfo)
        assert 8 + len(raw) <= info.begin <= info.end <= 8 + len(raw) + data_size  # never outside the data
        ends.append((info.begin, info.end))
    spans = sorted(span for span in ends if span[1] > span[0])
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))  # never overlapping


@FUZZ
@given(headers())
def test_structured_safetensors_headers(case):
    header, data_size = case
    _check_header(json.dumps(header).encode(), data_size)


@FUZZ
@given(json_values, st.integers(0, 64))
def test_any_json_as_a_safetensors_header(value, data_size):
    _check_header(json.dumps(value).encode(), data_size)


@FUZZ
@given(st.binary(max_size=300), st.integers(0, 64))
def test_any_bytes_as_a_safetensors_header(raw, data_size):
    _check_header(raw, data_size)


BASE = {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "hidden_size": 64, "num_attention_heads": 4,
        "num_key_value_heads": 2, "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": 1000,
        "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "eos_token_id": 2,
        "tie_word_embeddings": False, "sliding_window": None, "rope_scaling": None}
KEYS = [*BASE, "head_dim", "partial_rotary_factor", "rope_parameters", "original_max_position_embeddings",
        "num_local_experts", "num_experts_per_tok", "router_jitter_noise", "torch_dtype", "dtype", "hidden_act",
        "layer_norm_eps", "bos_token_id", "pad_token_id", "qk_layernorm", "use_sliding_window"]
rope_blocks = st.fixed_dictionaries({}, optional={
    "type": st.sampled_from(["longrope", "su", "default", "yarn"]) | json_scalars,
    "rope_type": st.sampled_from(["longrope", "default"]) | json_scalars,
    "short_factor": st.lists(st.floats(allow_nan=True) | json_scalars, max_size=10),
    "long_factor": st.lists(st.floats(), max_size=10), "factor": json_scalars, "attention_factor": json_scalars,
    "short_mscale": json_scalars, "long_mscale": json_scalars, "rope_theta": json_scalars,
    "partial_rotary_factor": json_scalars, "original_max_position_embeddings": json_scalars})


@FUZZ
@given(st.dictionaries(st.sampled_from(KEYS), json_scalars | rope_blocks | st.lists(json_scalars, max_size=3),
                       max_size=6),
       st.dictionaries(st.sampled_from(["eos_token_id", "bos_token_id", "pad_token_id"]), json_values, max_size=2),
       st.lists(st.from_regex(r"model\.layers\.[0-9]{1,4}\.[a-z.]{1,10}", fullmatch=True), max_size=6))
def test_config_normaliser(changes, generation, tensor_names):
    raw = {**BASE, **changes}
    try:
        config = parse_config(raw, generation)
        check_tensors(config, tensor_names)
    except PhiOnnxError:
        return
    assert isinstance(config, ModelConfig)
    assert config.num_layers >= 1 and config.num_heads >= 1 and config.num_heads % config.num_kv_heads == 0
    assert config.num_layers <= 1 + max(int(n.split(".")[2]) for n in tensor_names)


@FUZZ
@given(st.dictionaries(st.text(max_size=10), json_values, max_size=8))
def test_any_object_as_a_config(raw):
    with contextlib.suppress(PhiOnnxError):
        parse_config(raw)
