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
afterwards. Columns are taken in their natural order, which keeps the blocks contiguous as
MatMulNBits needs; or, with `act_order`, in order of decreasing diag(H) (the inputs that matter most
first, while the most columns are left to take up their error) with every block's grid fixed up
front from the unmodified weights ("static groups"): the blocks stay contiguous, no g_idx.

The rows of the upper Cholesky factor U of H^-1 (H^-1 = U^T U) carry the update: column j's
error spreads onto columns j+1.. as err * U[j, j+1:] / U[j, j].
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from phi_onnx.quantize.clip import CHUNK, _grid, _steps
from phi_onnx.quantize.int4 import Int4Weight, grid_params, pack_int4, pad_columns

DAMP = 0.01  #: added to H's diagonal, as a fraction of its mean (the paper's 1 %)
LAZY_BATCH = 128
#: shrink ratios tried per block with `search` (more than the clip search's: here they cost little)
SEARCH_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65)


class Hessian:
    """Accumulates H = sum of x^T x over calibration inputs x [..., K]."""

    #: rows kept before they are summed: one product over many rows runs faster than several over
    #: a few (measured for K = 8192: 3.1 s for 8192 rows at once against 5.0 s in four parts)
    PENDING_ROWS = 8192

    def __init__(self, k: int) -> None:
        self.k = k
        self._sum = np.zeros((k, k), dtype=np.float32)
        self._pending: list[np.ndarray] = []
        self._pending_rows = 0
        self.tokens = 0

    def add(self, x: np.ndarray) -> None:
        """Add inputs `x` [..., K] (any leading shape); the rows are copied, so `x` may be reused."""
        rows = np.array(x, dtype=np.float32).reshape(-1, self.k)
        self._pending.append(rows)
        self._pending_rows += rows.shape[0]
        self.tokens += rows.shape[0]
        if self._pending_rows >= self.PENDING_ROWS:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        rows = self._pending[0] if len(self._pending) == 1 else np.concatenate(self._pending)
        self._pending, self._pending_rows = [], 0
        # x^T x of one array runs as a symmetric rank-k update (half a product's work), in float32
        # and summed in float32: a few sums of thousands of rows each.
        if self.tokens == rows.shape[0]:
            np.matmul(rows.T, rows, out=self._sum)
        else:
            self._sum += rows.T @ rows

    @property
    def sum32(self) -> np.ndarray:
        """X^T X as accumulated, float32 [K, K]."""
        self._flush()
        return self._sum

    @property
    def h(self) -> np.ndarray:
        """X^T X, float64 [K, K]."""
        return self.sum32.astype(np.float64)

    @property
    def mean_square(self) -> np.ndarray:
        """Each input's mean square, diag(H) / tokens, float64 [K] (without H's float64 copy)."""
        return np.diag(self.sum32).astype(np.float64) / max(self.tokens, 1)

    @property
    def mean(self) -> np.ndarray:
        """H / tokens: the mean outer product of the inputs."""
        return self.h / max(self.tokens, 1)


def upper_inverse_factor(hessian: np.ndarray, damp: float = DAMP, dtype: type = np.float64) -> np.ndarray:
    """U with U^T U = (H + damp * mean(diag H) * I)^-1, upper triangular, computed in `dtype`.

    With P the order-reversing permutation and P H P = L L^T, U = P L^-1 P.
    """
    h = np.array(hessian, dtype=dtype)
    h[np.diag_indices_from(h)] += damp * float(np.mean(np.diag(h)))
    return _flipped_inverse_factor(h)


def _flipped_inverse_factor(h: np.ndarray) -> np.ndarray:
    """P L^-1 P for P h P = L L^T (P reverses the order): upper triangular, in h's dtype.

    Raises `np.linalg.LinAlgError` when h is not positive definite at its precision.
    """
    lower_inverse = _inverse_cholesky(np.ascontiguousarray(h[::-1, ::-1]))
    return np.ascontiguousarray(lower_inverse[::-1, ::-1])


def _inverse_cholesky(a: np.ndarray) -> np.ndarray:
    """L^-1 for a = L L^T, by halves: with a = [[A, B^T], [B, C]], A = L1 L1^T, L21 = B L1^-T and
    C - L21 L21^T = L2 L2^T, L^-1 = [[L1^-1, 0], [-L2^-1 L21 L1^-1, L2^-1]].

    All the work is matrix products at a's precision: NumPy's LAPACK Cholesky ran at a quarter of
    the machine's matrix-product speed and it has no triangular inverse (measured for the K = 8192
    inputs of Phi-3-mini's down_proj: 4.7 s against 8.0 s for a float64 Cholesky and a blocked
    float32 inverse). The 512-wide leaves are factored in float64.
    """
    n = a.shape[0]
    if n <= 512:
        return np.tril(np.linalg.inv(np.linalg.cholesky(a.astype(np.float64)))).astype(a.dtype, copy=False)
    m = n // 2
    a_inv = _inverse_cholesky(a[:m, :m])
    l21 = a[m:, :m] @ a_inv.T
    d_inv = _inverse_cholesky(a[m:, m:] - l21 @ l21.T)
    out = np.zeros_like(a)
    out[:m, :m] = a_inv
    out[m:, m:] = d_inv
    out[m:, :m] = -(d_inv @ (l21 @ a_inv))
    return out


@dataclass(frozen=True)
class Factor:
    """What GPTQ needs of one Hessian: computed once for all the linears that read the same input
    (Phi-2's attention and MLP both read the layer's normed input)."""

    u: np.ndarray  # [kp, kp] upper factor of the damped inverse (`upper_inverse_factor`), in `order`
    dead: np.ndarray  # bool [kp]: inputs that were always zero (and the padding)
    cost: np.ndarray  # float32 [kp]: diag H, the clip search's weights
    order: np.ndarray | None = None  # act-order: the inputs by decreasing diag H; None: natural order


def gptq_factor(hessian: np.ndarray, block_size: int, damp: float = DAMP, dtype: type = np.float32,
                act_order: bool = False) -> Factor:
    """The `Factor` of `hessian` [K, K] for blocks of `block_size` (K padded to whole blocks)."""
    k = hessian.shape[0]
    kp = -(-k // block_size) * block_size
    h = np.zeros((kp, kp), dtype=dtype)
    h[:k, :k] = hessian
    dead = np.diag(h) == 0  # nothing to preserve there
    h[dead, dead] = 1.0
    cost = np.diag(h).astype(np.float32)
    order = np.argsort(-np.diag(h), kind="stable") if act_order else None
    if order is not None:
        h = h[order][:, order]
    h[np.diag_indices_from(h)] += damp * float(np.mean(np.diag(h), dtype=np.float64))
    try:
        return Factor(_flipped_inverse_factor(h), dead, cost, order)
    except np.linalg.LinAlgError:
        if dtype == np.float64:
            raise
    # rounding to `dtype` left the damped Hessian indefinite: once more in float64
    exact = gptq_factor(hessian, block_size, damp, np.float64, act_order)
    return replace(exact, u=exact.u.astype(dtype))


def quantize_gptq(weight: np.ndarray, hessian: np.ndarray | None, block_size: int = 32, symmetric: bool = True,
                  *, damp: float = DAMP, lazy_batch: int = LAZY_BATCH, scale_dtype: type = np.float32,
                  dtype: type = np.float32, search: bool = False, act_order: bool = False,
                  factor: Factor | None = None) -> Int4Weight:
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
        dtype: working precision of the weight updates and of H^-1's factor (float64 for exact
            reference checks).
        search: choose each block's range by the clip search (the shrink ratio with the least
            squared error, weighted by diag H) instead of the block's extremes.
        act_order: columns by decreasing diag H, on block grids fixed beforehand (static groups).
        factor: `gptq_factor(hessian, block_size, damp, dtype, act_order)` computed beforehand (then
            `hessian`, `damp` and `act_order` are not used), for weights that share their inputs.
    """
    n, k = weight.shape
    if factor is None:
        assert hessian is not None
        factor = gptq_factor(hessian, block_size, damp, dtype, act_order)
    # Transposed, [kp, N]: each input column of W is a contiguous row, so the per-column updates
    # stream through memory instead of striding across it.
    w = np.array(pad_columns(weight, block_size, dtype).T if k % block_size else weight.T, dtype=dtype, order="C")
    kp = w.shape[0]
    w[factor.dead] = 0.0
    u = factor.u.astype(dtype, copy=False)
    values = np.zeros((kp, n), dtype=np.uint8)
    blocks = kp // block_size
    scales = np.zeros((n, blocks), dtype=np.float32)
    zeros = np.zeros((n, blocks), dtype=np.float32)
    batch = max(1, lazy_batch // block_size) * block_size  # blocks never straddle two batches
    spare = np.empty((max(kp - batch, 0), n), dtype=dtype)
    order = factor.order
    if order is not None:  # static groups: every grid from the unmodified weights, then the columns permuted
        for b in range(blocks):
            cols = slice(b * block_size, (b + 1) * block_size)
            scales[:, b], zeros[:, b] = _block_params(w[cols], factor.cost[cols],
                                                      symmetric, scale_dtype, search)
        w = w[order]
        block_of = order // block_size
        grid_s, grid_z = scales.T.astype(dtype), zeros.T.astype(dtype)
    for i1 in range(0, kp, batch):
        i2 = min(i1 + batch, kp)
        w1, u1 = w[i1:i2], u[i1:i2, i1:i2]
        err1 = np.empty_like(w1)
        # Three levels of lazy updates: each column takes the errors of its block's earlier columns
        # when it is reached (one vector-matrix product), the block's errors go onto the rest of the
        # batch as one product, the batch's onto the later columns as another.
        for b1 in range(0, i2 - i1, block_size):
            b2 = b1 + block_size
            if order is None:  # the block's grid from its weights as they are now
                s, z = _block_params(w1[b1:b2], factor.cost[i1 + b1:i1 + b2], symmetric,
                                     scale_dtype, search)
                scales[:, (i1 + b1) // block_size] = s
                zeros[:, (i1 + b1) // block_size] = z
                s, z = s.astype(dtype), z.astype(dtype)
            for i in range(b1, b2):
                if order is not None:
                    s, z = grid_s[block_of[i1 + i]], grid_z[block_of[i1 + i]]
                column = w1[i] - u1[b1:i, i] @ err1[b1:i]
                q = np.clip(np.round(column / s) + z, 0, 15)
                values[i1 + i] = q
                err1[i] = (column - (q - z) * s) / u1[i, i]
            w1[b2:] -= u1[b1:b2, b2:].T @ err1[b1:b2]
        if i2 < kp:  # the product goes to one buffer for all batches: a fresh one per batch cost more
            update = np.matmul(u[i1:i2, i2:].T, err1, out=spare[: kp - i2])
            w[i2:] -= update
    if order is not None:
        natural = np.empty_like(values)
        natural[order] = values
        values = natural
    return pack_int4(values.T, scales, None if symmetric else zeros, k, block_size)


def _block_params(rows: np.ndarray, cost: np.ndarray, symmetric: bool, scale_dtype: type,
                  search: bool) -> tuple[np.ndarray, np.ndarray]:
    """The grid (scales [N], zero points [N]) of one block given as `rows` [block_size, N] (its input
    columns, as GPTQ holds them): searched, or from the block's extremes."""
    if search:
        return _searched_params(rows, cost, symmetric, scale_dtype)
    return grid_params(np.ascontiguousarray(rows.T), symmetric, scale_dtype)


def _searched_params(rows: np.ndarray, cost: np.ndarray, symmetric: bool,
                     scale_dtype: type) -> tuple[np.ndarray, np.ndarray]:
    """The block grid whose shrink ratio (of `SEARCH_RATIOS`) gives the least error weighted by `cost`.

    Each ratio's grid is `grid_params`' for that ratio (the clip search's `_grid`, with the ratios in
    float32: float64 weights may get scales one float32 rounding away from `grid_params`'). The block stays in
    GPTQ's [position, output] layout, cut into cache-sized pieces of outputs: no transposed copy, and
    every operation runs along contiguous rows.
    """
    width = max(1, CHUNK // len(rows))
    cost = cost.astype(rows.dtype)
    best_s = np.empty(rows.shape[1], dtype=rows.dtype)
    best_z = np.empty(rows.shape[1], dtype=rows.dtype)
    for c in range(0, rows.shape[1], width):
        x = rows[:, c:c + width]
        scales, zeros = _grid(x, symmetric, scale_dtype, SEARCH_RATIOS)
        work = np.empty_like(x)
        best_err = np.full(x.shape[1], np.inf, dtype=rows.dtype)
        best_s[c:c + width], best_z[c:c + width] = scales[0], zeros[0]  # ratio 1.0 unless one is better
        for s, z in zip(scales, zeros, strict=True):
            _steps(x, s, z, symmetric, work)
            work *= s
            work -= x
            np.square(work, out=work)
            err = cost @ work
            better = err < best_err
            np.copyto(best_err, err, where=better)
            np.copyto(best_s[c:c + width], s, where=better)
            np.copyto(best_z[c:c + width], z, where=better)
    return best_s, best_z
