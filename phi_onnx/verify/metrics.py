"""The figures that compare two sets of logits, in float64 numpy: log-softmax, max |Δ|, top-1, KL, NLL."""

from __future__ import annotations

from typing import Any

import numpy as np

from phi_onnx.verify.errors import VerifyError


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log softmax over the last axis, in float64."""
    x = logits.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def compare_logits(onnx: np.ndarray, reference: np.ndarray) -> dict[str, Any]:
    """Per-position figures for two [positions, vocab] logit arrays: max |Δ|, top-1 matches, KL(ref||onnx)."""
    if onnx.shape != reference.shape:
        raise VerifyError(f"The ONNX model gives logits of shape {onnx.shape}, the reference {reference.shape}.",
                          hint="The reference is not the model this folder was exported from; pass the right "
                               "one with --reference.")
    ref_lp, onnx_lp = log_softmax(reference), log_softmax(onnx)
    diff = np.abs(onnx.astype(np.float64) - reference.astype(np.float64))
    return {
        "max_abs": float(diff.max()) if diff.size else 0.0,
        "top1": onnx.argmax(-1) == reference.argmax(-1),
        "kl": (np.exp(ref_lp) * (ref_lp - onnx_lp)).sum(-1),
    }


def standard_error(groups: list[np.ndarray]) -> float:
    """Standard error of the mean over all positions of `groups` (one array of per-position values per
    sequence), clustered by sequence: positions of one sequence are correlated, sequences are not.

    The cluster-robust form for a mean of sums, sqrt(G / (G - 1) * sum_g (S_g - m n_g)^2) / N; NaN with
    fewer than two sequences.
    """
    sums = np.asarray([np.sum(g, dtype=np.float64) for g in groups])
    counts = np.asarray([np.size(g) for g in groups], dtype=np.float64)
    if len(groups) < 2 or counts.sum() == 0:
        return float("nan")
    mean = sums.sum() / counts.sum()
    g = len(groups)
    return float(np.sqrt(g / (g - 1) * np.sum((sums - mean * counts) ** 2)) / counts.sum())


def nll(logits: np.ndarray, ids: np.ndarray) -> float:
    """Mean negative log-likelihood (nats) of ids[1:] given logits[:-1], for one [length] window."""
    lp = log_softmax(logits[:-1])
    return float(-np.take_along_axis(lp, ids[1:, None], axis=-1).mean())
