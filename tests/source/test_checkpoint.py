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
