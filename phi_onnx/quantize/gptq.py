"""GPTQ (Frantar et al. 2022, arXiv:2210.17323) on the exact grid MatMulNBits dequantizes with.

For a linear layer y = x W^T with W [N, K] and calibration inputs X [tokens, K], GPTQ quantizes the
K input columns of W in order and, after each column, moves that column's rounding error onto the
columns not yet quantized, weighted by the inverse Hessian H^-1 (H = X^T X): the layer's output on
the calibration inputs changes as little as the grid allows. The blocked ("lazy batch")
formulation applies the error to the columns of the current batch of 128 at once per column and
to the remaining columns once per batch, as a matrix product.

On the MatMulNBits grid: each block of `block_size` input columns gets its scale (and zero point)
when GPTQ reaches its first column, from the weights as they are then (earlier errors already
added), rounded to the dtype the kernel stores scales in; every column of the block is then rounded
to exactly that grid. So the codes written are the codes GPTQ optimised, with no re-quantization
afterwards. Columns are taken in their natural order (no act-order), which keeps the blocks
contiguous as MatMulNBits needs.

The rows of the upper Cholesky factor U of H^-1 (H^-1 = U^T U) carry the update: column j's
error spreads onto columns j+1.. as err * U[j, j+1:] / U[j, j].
"""

from __future__ import annotations

import numpy as np

from phi_onnx.quantize.int4 import Int4Weight, grid_params, pack_int4, pad_columns

DAMP = 0.01  #: added to H's diagonal, as a fraction of its mean (the paper's 1 %)
LAZY_BATCH = 128
#: shrink ratios tried per block with `search` (more than the clip search's: here they cost little)
SEARCH_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65)


class Hessian:
    """Accumulates H = sum of x^T x over calibration inputs x [..., K], in float64."""

    def __init__(self, k: int) -> None:
        self.h = np.zeros((k, k), dtype=np.float64)
        self.tokens = 0

    def add(self, x: np.ndarray) -> None:
        """Add inputs `x` [..., K] (any leading shape)."""
        rows = np.asarray(x, dtype=np.float32).reshape(-1, self.h.shape[0])
        # float32 products per call (a few thousand rows), summed across calls in float64: twice the
        # speed of a float64 product, and the sums that grow are kept exact enough.
        self.h += (rows.T @ rows).astype(np.float64)
        self.tokens += rows.shape[0]

    @property
    def mean(self) -> np.ndarray:
        """H / tokens: the mean outer product of the inputs."""
        return self.h / max(self.tokens, 1)


def upper_inverse_factor(hessian: np.ndarray, damp: float = DAMP) -> np.ndarray:
    """U with U^T U = (H + damp * mean(diag H) * I)^-1, upper triangular, in float64.

    With P the order-reversing permutation and P H P = L L^T, U = P L^-1 P: one Cholesky factor
    and one inverse, instead of inverting H and factoring the inverse.
    """
    h = np.array(hessian, dtype=np.float64)
    h[np.diag_indices_from(h)] += damp * float(np.mean(np.diag(h)))
    lower = np.linalg.cholesky(h[::-1, ::-1])
    return np.ascontiguousarray(np.linalg.inv(lower)[::-1, ::-1])


def quantize_gptq(weight: np.ndarray, hessian: np.ndarray, block_size: int = 32, symmetric: bool = True,
                  *, damp: float = DAMP, lazy_batch: int = LAZY_BATCH, scale_dtype: type = np.float32,
                  dtype: type = np.float32, search: bool = False) -> Int4Weight:
    """GPTQ-quantize `weight` [N, K] given the Hessian [K, K] of its inputs (e.g. `Hessian.h`).

    Args:
        weight: float weight as checkpoints store it ([out, in]).
        hessian: X^T X over calibration inputs (any positive scale: only H^-1's shape matters).
        block_size: MatMulNBits block length along K.
        symmetric: without zero points (code 8 is zero) or with them.
        damp: dampening of H's diagonal, relative to its mean.
        lazy_batch: columns updated together (rounded up to whole blocks).
        scale_dtype: the dtype scales are stored in (float16 on CUDA): scales are rounded to it
            before any column is rounded with them.
        dtype: working precision of the weight updates (float64 for exact reference checks).
        search: choose each block's range by the clip search (the shrink ratio with the least
            squared error, weighted by diag H) instead of the block's extremes.
    """
    n, k = weight.shape
    w = pad_columns(weight, block_size, dtype)
    kp = w.shape[1]
    h = np.zeros((kp, kp), dtype=np.float64)
    h[:k, :k] = hessian
    dead = np.diag(h) == 0  # inputs that were always zero (and the padding): nothing to preserve
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    u = upper_inverse_factor(h, damp).astype(dtype)
    values = np.zeros((n, kp), dtype=np.uint8)
    blocks = kp // block_size
    scales = np.zeros((n, blocks), dtype=np.float32)
    zeros = np.zeros((n, blocks), dtype=np.float32)
    batch = max(1, lazy_batch // block_size) * block_size  # blocks never straddle two batches
    for i1 in range(0, kp, batch):
        i2 = min(i1 + batch, kp)
        w1 = w[:, i1:i2].copy()
        err1 = np.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            if i % block_size == 0:
                group = w1[:, i:i + block_size]
                if search:
                    s, z = _searched_params(group, np.diag(h)[i1 + i:i1 + i + block_size], symmetric, scale_dtype)
                else:
                    s, z = grid_params(group, symmetric, scale_dtype)
                scales[:, (i1 + i) // block_size] = s
                zeros[:, (i1 + i) // block_size] = z
                s, z = s.astype(dtype), z.astype(dtype)
            column = w1[:, i]
            q = np.clip(np.round(column / s) + z, 0, 15)
            values[:, i1 + i] = q
            err = (column - (q - z) * s) / u1[i, i]
            w1[:, i:] -= np.outer(err, u1[i, i:])
            err1[:, i] = err
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    return pack_int4(values, scales, None if symmetric else zeros, k, block_size)


def _searched_params(group: np.ndarray, cost: np.ndarray, symmetric: bool,
                     scale_dtype: type) -> tuple[np.ndarray, np.ndarray]:
    """The block grid (scales, zero points) whose shrink ratio gives the least weighted error."""
    best = None
    for ratio in SEARCH_RATIOS:
        s, z = grid_params(group, symmetric, scale_dtype, ratio)
        back = (np.clip(np.round(group / s[:, None]) + z[:, None], 0, 15) - z[:, None]) * s[:, None]
        err = ((back - group) ** 2 * cost).sum(-1)
        if best is None:
            best = (err, s, z)
        else:
            better = err < best[0]
            best = (np.where(better, err, best[0]), np.where(better, s, best[1]), np.where(better, z, best[2]))
    assert best is not None
    return best[1], best[2]
