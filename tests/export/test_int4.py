"""int4 mechanics, checked exactly against a quantization-aware reference on random weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import OnnxLM, prompt_then_decode, random_ids

from phi_onnx.quantize import dequantize_int4, quantize_int4


def fake_quantized(model, block_size: int, symmetric: bool):
    """The reference with every projection (and the LM head) replaced by its int4 round trip."""
    for _name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            w = module.weight.detach().numpy()
            q = dequantize_int4(quantize_int4(w, block_size, symmetric))
            module.weight = torch.nn.Parameter(torch.from_numpy(q))  # a new tensor also unties lm_head
    return model


@pytest.mark.parametrize(("name", "block_size", "symmetric"),
                         [("phi3-mha", 32, True), ("phi3-gqa", 16, False), ("phi4mini", 64, True)])
def test_int4_matches_quantization_aware_reference(name, block_size, symmetric, make_checkpoint, make_export):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(make_checkpoint(name), dtype=torch.float32).eval()
    reference = fake_quantized(model, block_size, symmetric)
    ids = random_ids(20, seed=11)
    with torch.no_grad():
        expected = reference(torch.from_numpy(ids)).logits.numpy()
    # accuracy level 1 keeps activations in fp32, so only the weight rounding differs from fp32. The
    # embedding stays full here (test_int4_embeddings.py checks the quantized one).
    folder = make_export(name, "int4", block_size=block_size, symmetric=symmetric, accuracy_level=1,
                         embeddings="full", lm_head_bits=4)
    got = prompt_then_decode(folder, ids, prompt_len=12)
    assert np.abs(got - expected).max() <= 2e-4


def test_int4_differs_from_fp32(make_export):
    """Guards the test above: int4 rounding is visible, so matching the fake-quantized model means something."""
    ids = random_ids(12, seed=2)
    fp32 = OnnxLM(make_export("phi3-mha"))(ids)
    int4 = OnnxLM(make_export("phi3-mha", "int4", accuracy_level=1))(ids)
    assert np.abs(fp32 - int4).max() > 1e-2


@pytest.mark.parametrize("symmetric", [True, False])
def test_quantize_round_trip_error_is_bounded(symmetric):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 200)).astype(np.float32)  # K not a multiple of the block size
    q = quantize_int4(w, 32, symmetric)
    assert q.packed.shape == (64, 7, 16)
    back = dequantize_int4(q)
    assert back.shape == w.shape
    blocks = np.pad(np.abs(w), ((0, 0), (0, 24))).reshape(64, 7, 32).max(axis=2)
    # Symmetric maps the signed extreme to -8, so the other side may clip by up to one step (max/8);
    # asymmetric spreads [min, max] (at most 2*max wide) over 15 steps and rounds to half a step.
    bound = blocks / 8 if symmetric else blocks / 15
    err = np.pad(np.abs(back - w), ((0, 0), (0, 24))).reshape(64, 7, 32).max(axis=2)
    assert np.all(err <= bound * 1.001 + 1e-6)
    assert not np.allclose(back, w)
