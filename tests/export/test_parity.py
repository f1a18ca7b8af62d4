"""fp32 exports match the transformers model on the same weights, prompt and KV-cache decode."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import OnnxLM, prompt_then_decode, random_ids

TOL = 1e-4


def reference_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(ids)).logits.numpy()



@pytest.mark.parametrize("name", ["phi3-mha", "phi3-gqa", "phi4mini", "phi3-rot24"])
def test_prompt_and_decode_match_transformers(name, make_checkpoint, make_export, reference_model):
    ids = random_ids(24, seed=1)
    expected = reference_logits(reference_model(make_checkpoint(name)), ids)
    got = prompt_then_decode(make_export(name), ids, prompt_len=12)  # 12 decode steps use the cache
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= TOL


@pytest.mark.parametrize("name", ["phi4mini", "phi3-rot24"])
@pytest.mark.parametrize("length", [64, 65, 100])
def test_longrope_both_sides_of_the_original_context(name, length, make_checkpoint, make_export,
                                                     reference_model):
    """Up to 64 tokens use the short factors, beyond it the long ones, as transformers does."""
    ids = random_ids(length, seed=length)
    expected = reference_logits(reference_model(make_checkpoint(name)), ids)
    got = OnnxLM(make_export(name))(ids)
    assert np.abs(got - expected).max() <= TOL


def test_longrope_decode_after_the_switch(make_checkpoint, make_export, reference_model):
    """Decoding in the long regime (after the runtime re-prefills at the crossing) stays exact."""
    ids = random_ids(80, seed=3)
    expected = reference_logits(reference_model(make_checkpoint("phi4mini")), ids)
    got = prompt_then_decode(make_export("phi4mini"), ids, prompt_len=70)
    assert np.abs(got - expected).max() <= TOL


def test_long_and_short_factors_really_differ(make_checkpoint, reference_model):
    """Guards the test above: the fixture's factors change the logits, so a wrong switch would show."""
    ids = random_ids(70, seed=4)
    model = reference_model(make_checkpoint("phi4mini"))
    long_logits = reference_logits(model, ids)[:, :60]
    short_logits = reference_logits(model, ids[:, :60])
    assert np.abs(long_logits - short_logits).max() > 1e-2


def test_sliding_window_past_the_window(make_checkpoint, make_export, reference_model):
    """Phi-3-mini's sliding window (8 here): 40 tokens, prompt and decode steps well past it."""
    ids = random_ids(40, seed=5)
    model = reference_model(make_checkpoint("phi3-window"))
    expected = reference_logits(model, ids)
    got = prompt_then_decode(make_export("phi3-window"), ids, prompt_len=24)
    assert np.abs(got - expected).max() <= TOL
    # The window matters: the same weights without it give different logits.
    full = OnnxLM(make_export("phi3-mha"))(ids)
    assert np.abs(full - expected).max() > 1e-2


@pytest.mark.parametrize("name", ["phi3-mha", "phi3-rot24"])
def test_right_padded_batch_matches_single_rows(name, make_checkpoint, make_export, reference_model):
    """Two prompts of different lengths in one right-padded batch, fused and op-based rotary alike."""
    import onnxruntime as ort

    folder = make_export(name)
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    short, long = random_ids(9, seed=21), random_ids(14, seed=22)
    ids = np.zeros((2, 14), np.int64)
    mask = np.zeros((2, 14), np.int64)
    ids[0, :9], mask[0, :9] = short[0], 1
    ids[1], mask[1] = long[0], 1
    feeds = {"input_ids": ids, "attention_mask": mask}
    for spec in session.get_inputs():
        if spec.name.startswith("past_key_values"):
            feeds[spec.name] = np.zeros((2, spec.shape[1], 0, spec.shape[3]), np.float32)
    logits = session.run(["logits"], feeds)[0]
    model = reference_model(make_checkpoint(name))
    assert np.abs(logits[0, :9] - reference_logits(model, short)[0]).max() <= TOL
    assert np.abs(logits[1] - reference_logits(model, long)[0]).max() <= TOL
