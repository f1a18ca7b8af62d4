"""The clip search's fast path (transposed L2-sized chunks on threads) against its plain formulation."""

from __future__ import annotations

import numpy as np
import pytest

from phi_onnx.quantize import clip
from phi_onnx.quantize.int4 import Int4Weight, codes, grid_params, pack_int4, pad_columns, round_scales


def reference_clip(weight: np.ndarray, block_size: int, symmetric: bool, importance: np.ndarray | None,
                   scale_dtype: type) -> Int4Weight:
    """The search written block by block over the whole matrix at once (the implementation before the
    fast path): every ratio's grid, its refit, then the refits of the best, each kept where it helps."""
    n, k = weight.shape
    blocks = pad_columns(weight, block_size).reshape(n, -1, block_size)
    cost = np.ones(blocks.shape[1:], dtype=np.float32)
    if importance is not None:
        cost = pad_columns(np.asarray(importance, np.float32)[None], block_size)[0].reshape(-1, block_size)
        cost = cost / max(float(cost.mean()), 1e-30) + 1e-6
    best_err = np.full(blocks.shape[:2], np.inf, dtype=np.float32)
    best_scales = np.zeros(blocks.shape[:2], dtype=np.float32)
    best_zero = np.zeros(blocks.shape[:2], dtype=np.float32)

    def keep(scales: np.ndarray, zero: np.ndarray) -> None:
        back = (codes(blocks, scales, zero) - zero[..., None]) * scales[..., None]
        err = (np.square(back - blocks) * cost).sum(axis=-1)
        better = err < best_err
        best_err[better], best_scales[better], best_zero[better] = err[better], scales[better], zero[better]

    def refit(scales: np.ndarray, zero: np.ndarray) -> np.ndarray:
        steps = codes(blocks, scales, zero) - zero[..., None]
        num = (cost * steps * blocks).sum(axis=-1)
        den = (cost * steps * steps).sum(axis=-1)
        fitted = np.where(den > 0, num / np.where(den > 0, den, 1.0), scales)
        return round_scales(fitted.astype(np.float32), scale_dtype)

    for ratio in clip.RATIOS:
        scales, zero = grid_params(blocks, symmetric, scale_dtype, ratio)
        keep(scales, zero)
        keep(refit(scales, zero), zero)
    for _ in range(clip.REFITS - 1):
        keep(refit(best_scales, best_zero), best_zero.copy())
    values = codes(blocks, best_scales, best_zero).reshape(n, -1)
    return pack_int4(values, best_scales, None if symmetric else best_zero, k, block_size)


def bf16_like(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Heavy-tailed weights rounded to bfloat16 precision (as checkpoints hold them): equal magnitudes of
    both signs within a block are common, so the extreme's tie-break is exercised."""
    w = (rng.standard_t(5, shape) * 0.02).astype(np.float32)
    w = (w.view(np.uint32) & 0xFFFF0000).view(np.float32)
    w[0, :16] = 0.0  # an all-zero (symmetric: scale tiny) block, and one with a +v/-v tie in each order
    w[1, :4] = [0.5, -0.5, 0.1, 0.0]
    w[2, :4] = [-0.5, 0.5, 0.1, 0.0]
    return w


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize(("n", "k", "block", "chunk"), [
    (48, 256, 32, 1 << 11),  # several chunks, the last one partial
    (37, 200, 32, 1 << 10),  # K padded to whole blocks
    (20, 512, 256, 1 << 9),  # block > 128: numpy's pairwise sum splits it in halves; chunks of one row
    (24, 144, 16, 1 << 22),  # one chunk
])
@pytest.mark.parametrize(("weighted", "scale_dtype"), [(False, np.float32), (True, np.float32),
                                                       (True, np.float16)])
def test_fast_path_is_bit_identical_to_the_plain_search(monkeypatch, symmetric, n, k, block, chunk, weighted,
                                                        scale_dtype):
    rng = np.random.default_rng([n, k, block])
    w = bf16_like(rng, (n, k))
    importance = rng.gamma(0.5, 2.0, k) if weighted else None  # float64, as calibration passes it
    monkeypatch.setattr(clip, "CHUNK", chunk)
    got = clip.quantize_clip(w, block, symmetric, importance=importance, scale_dtype=scale_dtype)
    want = reference_clip(w, block, symmetric, importance, scale_dtype)
    assert np.array_equal(got.packed, want.packed)
    assert np.array_equal(got.scales, want.scales)
    if symmetric:
        assert got.zero_points is None
    else:
        assert np.array_equal(got.zero_points, want.zero_points)
    assert (got.n, got.k, got.block_size) == (n, k, block)


def test_block_sum_is_numpys_order():
    """Sums of values of very different magnitudes differ with the order of additions: these must not."""
    rng = np.random.default_rng(0)
    for n in (8, 16, 24, 32, 64, 128, 256):
        x = (rng.standard_normal((300, n)) * np.exp(rng.standard_normal((300, n)) * 4)).astype(np.float32)
        assert np.array_equal(clip._block_sum(np.ascontiguousarray(x.T)), x.sum(axis=-1)), n
