"""The streaming safetensors reader: dtypes, shards, corruption."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from phi_onnx.errors import CheckpointError
from phi_onnx.source.checkpoint import Checkpoint


def test_reads_bf16_fp16_fp32_exactly(tmp_path):
    tensors = {
        "a": torch.randn(3, 5, dtype=torch.bfloat16),
        "b": torch.randn(7, dtype=torch.float16),
        "c": torch.randn(2, 2, 2, dtype=torch.float32),
    }
    save_file(tensors, tmp_path / "model.safetensors")
    ckpt = Checkpoint(tmp_path)
    assert sorted(ckpt.names()) == ["a", "b", "c"]
    for name, tensor in tensors.items():
        np.testing.assert_array_equal(ckpt.read(name), tensor.float().numpy())
    assert ckpt.read("a", ml_dtypes.bfloat16).dtype == ml_dtypes.bfloat16


def test_sharded_checkpoint_with_index(tmp_path):
    save_file({"x": torch.ones(4)}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({"y": torch.zeros(2, 3)}, tmp_path / "model-00002-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {"x": "model-00001-of-00002.safetensors",
                                            "y": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    ckpt = Checkpoint(tmp_path)
    assert ckpt.read("y").shape == (2, 3)
    assert len(ckpt.files) == 2
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing shards"):
        Checkpoint(tmp_path)


def test_missing_tensor_is_named(tmp_path):
    save_file({"x": torch.ones(4)}, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"no tensor 'model.norm.weight'"):
        Checkpoint(tmp_path).info("model.norm.weight")


@pytest.mark.parametrize("cut", [3, 20, 40])
def test_corrupt_or_truncated_files(tmp_path, cut):
    save_file({"x": torch.ones(64)}, tmp_path / "model.safetensors")
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:cut])
    with pytest.raises(CheckpointError, match=r"truncated|corrupt|too short"):
        Checkpoint(tmp_path)


def write_raw(path, header, data: bytes = b"\0" * 64) -> None:
    """A safetensors file with exactly this header (a dict, list, or raw JSON text)."""
    text = header if isinstance(header, str) else json.dumps(header)
    raw = text.encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)


GOOD = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}


@pytest.mark.parametrize(("header", "message"), [
    ([GOOD], "not a JSON object"),
    ({"x": [1, 2]}, "entry for 'x' is not an object"),
    ({"x": "F32"}, "entry for 'x' is not an object"),
    ({"x": {"dtype": "F32", "shape": [4]}}, "invalid data_offsets \\(None\\)"),
    ({"x": {"dtype": "F32", "shape": [4], "data_offsets": "0,16"}}, "invalid data_offsets"),
    ({"x": {"dtype": "F32", "shape": [4], "data_offsets": ["0", "16"]}}, "invalid data_offsets"),
    ({"x": {"dtype": "F32", "shape": [4], "data_offsets": [-16, 0]}}, "invalid data_offsets"),
    ({"x": {"dtype": "F32", "shape": [4], "data_offsets": [16, 0]}}, "invalid data_offsets"),
    ({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16, 32]}}, "invalid data_offsets"),
    ({"x": {"dtype": "F32", "shape": [4], "data_offsets": [True, 16]}}, "invalid data_offsets"),
    ({"x": {"dtype": "F32", "shape": "4", "data_offsets": [0, 16]}}, "no valid shape"),
    ({"x": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, "no valid shape"),
    ({"x": {"dtype": "F32", "shape": [2.0, 2], "data_offsets": [0, 16]}}, "no valid shape"),
    ({"x": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 16]}}, "does not match its shape"),
    ({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 10**6]}}, "does not match its shape"),
    ({"x": {"dtype": "F32", "shape": [64], "data_offsets": [0, 256]}}, "is truncated"),
    ({"x": {"dtype": "F4", "shape": [4], "data_offsets": [0, 16]}}, "unsupported dtype 'F4'"),
    ({"x": {"dtype": 5, "shape": [4], "data_offsets": [0, 16]}}, "unsupported dtype 5"),
    ({"x": {"shape": [4], "data_offsets": [0, 16]}}, "unsupported dtype None"),
    ({"a": GOOD, "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, "'a' and 'b' overlap"),
    ({"a": {"dtype": "F32", "shape": [8], "data_offsets": [0, 32]}, "b": GOOD, "c": {**GOOD, "data_offsets": [32, 48]}},
     "overlap"),
    ({"__metadata__": [1], "x": GOOD}, "__metadata__ is not an object"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('{"x": ' * 100_000 + "1" + "}" * 100_000, "nested too deeply"),
    ("\xff\xfe", "corrupt safetensors header"),
])
def test_hostile_headers_are_refused(tmp_path, header, message):
    if isinstance(header, str) and header.startswith("\xff"):
        raw = b"\xff\xfe"
        (tmp_path / "model.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw + b"\0" * 64)
    else:
        write_raw(tmp_path / "model.safetensors", header)
    with pytest.raises(CheckpointError, match=message):
        Checkpoint(tmp_path)


def test_touching_and_empty_tensors_are_fine(tmp_path):
    write_raw(tmp_path / "model.safetensors", {
        "a": GOOD, "b": {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]},
        "e": {"dtype": "F32", "shape": [0], "data_offsets": [16, 16]}, "__metadata__": {"format": "pt"}})
    ckpt = Checkpoint(tmp_path)
    assert ckpt.read("b").shape == (4,) and ckpt.read("e").shape == (0,)


@pytest.mark.parametrize("dtype", ["I16", "I32", "I64", "I8", "U8", "BOOL"])
def test_integer_weights_are_refused_naming_the_dtype(tmp_path, dtype):
    itemsize = {"I16": 2, "I32": 4, "I64": 8, "I8": 1, "U8": 1, "BOOL": 1}[dtype]
    write_raw(tmp_path / "model.safetensors", {"w": {"dtype": dtype, "shape": [4], "data_offsets": [0, 4 * itemsize]}})
    ckpt = Checkpoint(tmp_path)  # the header is valid: only using it as a weight is refused
    with pytest.raises(CheckpointError, match=f"'w' is stored as {dtype}, which phi-onnx does not read"):
        ckpt.info("w")


def test_i16_weight_refused_by_export(tmp_path, make_checkpoint):
    """The issue's case: an int16 norm weight used to be exported silently as floats."""
    import shutil

    from safetensors.numpy import load_file
    from safetensors.numpy import save_file as save_numpy

    from phi_onnx.export import export

    ckpt = tmp_path / "ckpt"
    shutil.copytree(make_checkpoint("phi3-mha"), ckpt)
    tensors = load_file(ckpt / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"].astype(np.int16)
    save_numpy(tensors, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"'model\.norm\.weight' is stored as I16"):
        export(ckpt, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_weights_file_that_is_a_fifo_does_not_hang(tmp_path):
    import os

    os.mkfifo(tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="is a pipe, not a weights file"):
        Checkpoint(tmp_path)


def test_weights_file_that_is_a_folder_or_a_symlink_loop(tmp_path):
    (tmp_path / "model.safetensors").mkdir()
    with pytest.raises(CheckpointError, match="is a folder, not a weights file"):
        Checkpoint(tmp_path)
    (tmp_path / "model.safetensors").rmdir()
    (tmp_path / "model.safetensors").symlink_to(tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"Cannot read .*model\.safetensors"):
        Checkpoint(tmp_path)


@pytest.mark.parametrize(("weight_map", "message"), [
    (["model.safetensors"], "`weight_map` must map"),
    ({}, "`weight_map` must map"),
    ({"x": "/etc/elsewhere.safetensors"}, "not a file name inside the checkpoint folder"),
    ({"x": "../other/model.safetensors"}, "not a file name inside"),
    ({"x": 5}, "not a file name inside"),
    ({"x": ".."}, "not a file name inside"),
])
def test_bad_shard_index(tmp_path, weight_map, message):
    other = tmp_path / "other"
    other.mkdir()
    save_file({"x": torch.ones(4)}, other / "model.safetensors")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=message):
        Checkpoint(ckpt)
    (ckpt / "model.safetensors.index.json").write_text("[]")
    with pytest.raises(CheckpointError, match="`weight_map` must map"):
        Checkpoint(ckpt)


def test_shards_that_are_symlinks_into_a_blob_store_still_work(tmp_path):
    """The Hugging Face cache links snapshot files to ../../blobs: a link is fine, a path in the index is not."""
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    save_file({"x": torch.ones(4)}, blobs / "abc123")
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    (snapshot / "model-00001-of-00001.safetensors").symlink_to(blobs / "abc123")
    (snapshot / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"x": "model-00001-of-00001.safetensors"}}))
    assert Checkpoint(snapshot).read("x").tolist() == [1.0] * 4
