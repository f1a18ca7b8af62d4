"""int4 algorithms: exact MatMulNBits layout (checked against ORT's kernel) and GPTQ against a reference."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from phi_onnx.quantize import Hessian, dequantize_int4, quantize_clip, quantize_gptq, quantize_int4
from phi_onnx.quantize.gptq import gptq_factor, upper_inverse_factor
from phi_onnx.quantize.int4 import Int4Weight


def matmul_nbits(x: np.ndarray, q: Int4Weight) -> np.ndarray:
    """x @ W^T as ORT's MatMulNBits computes it from the packed weight (one-node session, fp32 compute)."""
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))]
    inits = [helper.make_tensor("w", TensorProto.UINT8, q.packed.shape, q.packed.tobytes(), raw=True),
             helper.make_tensor("s", TensorProto.FLOAT, q.scales.shape, q.scales.tobytes(), raw=True)]
    names = ["x", "w", "s"]
    if q.zero_points is not None:
        inits.append(helper.make_tensor("z", TensorProto.UINT8, q.zero_points.shape, q.zero_points.tobytes(),
                                        raw=True))
        names.append("z")
    node = helper.make_node("MatMulNBits", names, ["y"], domain="com.microsoft", K=q.k, N=q.n, bits=4,
                            block_size=q.block_size, accuracy_level=1)
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def correlated_inputs(k: int, tokens: int, seed: int, sample: int = 0) -> np.ndarray:
    """Inputs with correlated channels and a few large ones, like a transformer's activations;
    `seed` fixes the distribution, `sample` the draw from it."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((k, k)) / np.sqrt(k) + np.eye(k)
    large = rng.choice(k, 3, replace=False)
    x = np.random.default_rng([seed, sample]).standard_normal((tokens, k)) @ mix
    x[:, large] *= 8
    return x.astype(np.float32)


def quantized(algo: str, w: np.ndarray, x: np.ndarray, block: int, symmetric: bool) -> Int4Weight:
    if algo == "rtn":
        return quantize_int4(w, block, symmetric)
    if algo == "clip":
        return quantize_clip(w, block, symmetric, importance=(x.astype(np.float64) ** 2).mean(0))
    hessian = Hessian(w.shape[1])
    hessian.add(x)
    return quantize_gptq(w, hessian.h, block, symmetric)


@pytest.mark.parametrize("algo", ["rtn", "clip", "gptq"])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize(("k", "block"), [(256, 16), (256, 32), (384, 64), (256, 128), (512, 256), (200, 32)])
def test_packed_weights_are_what_matmulnbits_computes(algo, symmetric, k, block):
    rng = np.random.default_rng(k + block)
    w = (rng.standard_normal((48, k)) * 0.05).astype(np.float32)
    x = correlated_inputs(k, 64, seed=block)
    q = quantized(algo, w, x, block, symmetric)
    assert q.packed.shape == (48, -(-k // block), block // 2)
    assert (q.zero_points is None) == symmetric
    expected = x.astype(np.float64) @ dequantize_int4(q).T.astype(np.float64)
    got = matmul_nbits(x, q)
    scale = np.abs(expected).max()
    assert np.abs(got - expected).max() <= 1e-5 * scale
    assert np.abs(dequantize_int4(q) - w).max() < 0.5 * np.abs(w).max()  # a real quantization of w


@pytest.mark.parametrize("symmetric", [True, False])
def test_clip_never_worse_than_rtn_per_block(symmetric):
    rng = np.random.default_rng(3)
    w = rng.standard_t(4, (64, 256)).astype(np.float32)  # heavy tails: clipping pays off
    importance = rng.uniform(0.1, 2.0, 256)
    cost = np.broadcast_to(importance, w.shape)

    def block_errors(q: Int4Weight) -> np.ndarray:
        return ((dequantize_int4(q) - w) ** 2 * cost).reshape(64, 8, 32).sum(-1)

    rtn = block_errors(quantize_int4(w, 32, symmetric))
    clip = block_errors(quantize_clip(w, 32, symmetric, importance=importance))
    assert np.all(clip <= rtn * (1 + 1e-5) + 1e-9)
    assert clip.sum() < 0.95 * rtn.sum()  # measured 0.92 (asymmetric) and lower (symmetric)


def reference_gptq(w: np.ndarray, h: np.ndarray, block: int, symmetric: bool, damp: float = 0.01,
                   act_order: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GPTQ written plainly in float64 (the OBQ form: no Cholesky, no lazy batches): quantize column j
    with its block's grid, spread its error over the columns not yet quantized by H^-1's row j, then
    remove column j from H^-1 by one step of Gaussian elimination (its row is zero from then on).
    With `act_order`, columns by decreasing diag H and every grid from the unmodified weights."""
    w = w.astype(np.float64).copy()
    n, k = w.shape
    h = h.astype(np.float64).copy()
    h[np.diag_indices(k)] += damp * np.mean(np.diag(h))
    h_inv = np.linalg.inv(h)
    codes = np.zeros((n, k))
    scales = np.zeros((n, k // block))
    zeros = np.zeros((n, k // block))

    def grid(group: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if symmetric:
            extreme = group[np.arange(n), np.abs(group).argmax(1)]
            return (extreme / -8.0).astype(np.float32).astype(np.float64), np.full(n, 8.0)
        lo, hi = np.minimum(group.min(1), 0), np.maximum(group.max(1), 0)
        s = ((hi - lo) / 15.0).astype(np.float32).astype(np.float64)
        return s, np.clip(np.round(-lo / s), 0, 15)

    if act_order:
        for b in range(k // block):
            scales[:, b], zeros[:, b] = grid(w[:, b * block:(b + 1) * block])
    for j in np.argsort(-np.diag(h), kind="stable") if act_order else range(k):
        if not act_order and j % block == 0:
            scales[:, j // block], zeros[:, j // block] = grid(w[:, j:j + block])
        s, z = scales[:, j // block], zeros[:, j // block]
        codes[:, j] = np.clip(np.round(w[:, j] / s) + z, 0, 15)
        err = (w[:, j] - (codes[:, j] - z) * s) / h_inv[j, j]
        w -= np.outer(err, h_inv[j])
        h_inv = h_inv - np.outer(h_inv[:, j], h_inv[j, :]) / h_inv[j, j]
    return codes, scales, zeros


def unpacked_codes(q: Int4Weight) -> np.ndarray:
    values = np.empty((q.n, q.packed.shape[1], q.block_size), dtype=np.uint8)
    values[..., 0::2] = q.packed & 0x0F
    values[..., 1::2] = q.packed >> 4
    return values.reshape(q.n, -1)


@pytest.mark.parametrize(("symmetric", "block", "lazy", "k", "act_order"),
                         [(True, 16, 32, 128, False), (False, 32, 64, 128, False), (True, 64, 64, 128, False),
                          (False, 32, 128, 544, False),  # K > 256: H^-1's factor by blocks, two levels deep
                          (True, 32, 64, 128, True), (False, 16, 32, 128, True), (True, 32, 128, 544, True)])
def test_gptq_equals_plain_float64_reference(symmetric, block, lazy, k, act_order):
    rng = np.random.default_rng(block)
    w = rng.standard_normal((24, k))
    x = correlated_inputs(k, 300, seed=1).astype(np.float64)
    h = x.T @ x
    want_codes, want_scales, want_zeros = reference_gptq(w, h, block, symmetric, act_order=act_order)
    q = quantize_gptq(w, h, block, symmetric, lazy_batch=lazy, dtype=np.float64, act_order=act_order)
    assert np.array_equal(unpacked_codes(q), want_codes)
    np.testing.assert_allclose(q.scales.reshape(24, -1), want_scales, rtol=1e-6)
    if not symmetric:
        zp = q.zero_points.reshape(24, -1)
        assert np.array_equal(np.stack([zp & 15, zp >> 4], 2).reshape(24, -1)[:, : k // block], want_zeros)
    # A factor computed once for linears that share their inputs gives the same codes.
    shared = gptq_factor(h, block, dtype=np.float64, act_order=act_order)
    q_shared = quantize_gptq(w, None, block, symmetric, lazy_batch=lazy, dtype=np.float64, factor=shared)
    assert np.array_equal(unpacked_codes(q_shared), want_codes)
    # The float32 working precision used on real models takes the same decisions almost everywhere.
    q32 = quantize_gptq(w.astype(np.float32), h, block, symmetric, lazy_batch=lazy, act_order=act_order)
    assert (unpacked_codes(q32) == want_codes).mean() > 0.99


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_upper_inverse_factor_by_blocks(dtype):
    """U^T U is the damped inverse and U upper triangular at sizes the blocked inverse splits unevenly."""
    x = correlated_inputs(700, 900, seed=3).astype(np.float64)
    h = x.T @ x
    u = upper_inverse_factor(h, 0.01, dtype)
    assert u.dtype == dtype and np.array_equal(u, np.triu(u))
    damped = h + 0.01 * np.mean(np.diag(h)) * np.eye(700)
    residual = np.abs(u.astype(np.float64).T @ u.astype(np.float64) @ damped - np.eye(700)).max()
    assert residual < (1e-9 if dtype == np.float64 else 1e-3)


@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_lowers_output_error(symmetric):
    rng = np.random.default_rng(5)
    w = (rng.standard_normal((64, 256)) * 0.05).astype(np.float32)
    x = correlated_inputs(256, 4096, seed=2)
    fresh = correlated_inputs(256, 1024, seed=2, sample=1)  # same distribution, other draws

    def output_error(q: Int4Weight) -> float:
        return float(np.square(fresh @ (dequantize_int4(q) - w).T).mean())

    hessian = Hessian(256)
    hessian.add(x[:1000])
    hessian.add(x[1000:].reshape(4, -1, 256))  # accumulates in pieces, any leading shape
    assert hessian.tokens == 4096
    rtn = output_error(quantize_int4(w, 32, symmetric))
    gptq = output_error(quantize_gptq(w, hessian.h, 32, symmetric))
    # measured 0.70 (symmetric) and 0.67 (asymmetric) on these inputs
    assert gptq < 0.8 * rtn


def test_fp16_scales_are_the_grid_used():
    """With fp16 scales the codes are chosen for the fp16-rounded scale, as the kernel will read it."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((16, 64)).astype(np.float32)
    for q in (quantize_clip(w, 32, True, scale_dtype=np.float16),
              quantize_gptq(w, np.eye(64), 32, True, scale_dtype=np.float16)):
        assert np.array_equal(q.scales, q.scales.astype(np.float16).astype(np.float32))
        # identity Hessian: GPTQ spreads no error, so it is round-to-nearest on the fp16 grid
    rtn16 = quantize_gptq(w, np.eye(64), 32, True, scale_dtype=np.float16)
    blocks = w.reshape(16, 2, 32)
    s = rtn16.scales.reshape(16, 2)
    assert np.array_equal(unpacked_codes(rtn16).reshape(16, 2, 32), np.clip(np.round(blocks / s[..., None]) + 8, 0, 15))


def test_factor_falls_back_to_float64_where_float32_rounding_breaks_it():
    """Positive definite in float64, singular once rounded to float32: the factor is still computed."""
    h = np.array([[1.0, 1 - 1e-9], [1 - 1e-9, 1.0]])
    with pytest.raises(np.linalg.LinAlgError):
        upper_inverse_factor(h, 0.0, np.float32)
    factor = gptq_factor(h, 16, damp=0.0)
    exact = gptq_factor(h, 16, damp=0.0, dtype=np.float64)
    u = exact.u[:2, :2]
    np.testing.assert_allclose(u.T @ u @ h, np.eye(2), atol=1e-6)
    assert factor.u.dtype == np.float32 and np.array_equal(factor.u, exact.u.astype(np.float32))


def test_hessian_sums_rows_in_parts(monkeypatch):
    """Rows kept back and summed in one product, in several flushes, give X^T X."""
    monkeypatch.setattr(Hessian, "PENDING_ROWS", 100)
    x = correlated_inputs(64, 450, seed=4)
    hessian = Hessian(64)
    for part in np.array_split(x, 7):
        hessian.add(part)
    assert hessian.tokens == 450
    want = x.astype(np.float64).T @ x.astype(np.float64)
    np.testing.assert_allclose(hessian.h, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    hessian.add(x[:10])  # after the sum is read, more rows still add
    np.testing.assert_allclose(hessian.h, want + x[:10].astype(np.float64).T @ x[:10], rtol=1e-4,
                               atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_block_search_keeps_the_ratio_with_least_weighted_error(monkeypatch, symmetric):
    """Each output's block grid is the shrink ratio (of SEARCH_RATIOS) with the least cost-weighted squared
    error, written here directly from grid_params, also when the outputs are searched in pieces."""
    from phi_onnx.quantize import gptq
    from phi_onnx.quantize.int4 import grid_params

    monkeypatch.setattr(gptq, "CHUNK", 32 * 100)  # pieces of 100 outputs
    rng = np.random.default_rng(9)
    rows = (rng.standard_normal((32, 300)) * rng.random(300) * 0.1).astype(np.float32)  # [position, output]
    rows[rng.integers(32, size=40), rng.integers(300, size=40)] *= 6  # outliers the search may clip
    rows[:, 7] = 0.0  # an all-zero block
    cost = rng.random(32).astype(np.float32) + 0.1
    scales, zeros = gptq._searched_params(rows, cost, symmetric, np.float32)
    blocks = rows.T.astype(np.float64)
    errors, grids = [], []
    for ratio in gptq.SEARCH_RATIOS:
        s, z = grid_params(rows.T, symmetric, np.float32, ratio)
        codes = np.clip(np.round(rows.T / s[:, None]) + z[:, None], 0, 15)
        errors.append(((codes - z[:, None]) * s[:, None] - blocks) ** 2 @ cost)
        grids.append((s, z))
    errors = np.array(errors)
    best = errors.argmin(axis=0)
    ordered = np.sort(errors, axis=0)
    clear = (ordered[1] - ordered[0]) > 1e-4 * ordered[1]  # no near-tie that float rounding could flip
    assert clear.mean() > 0.9 and len(set(best[clear])) > 2  # several ratios win somewhere
    want_s = np.array([grids[b][0][i] for i, b in enumerate(best)])
    want_z = np.array([grids[b][1][i] for i, b in enumerate(best)])
    assert np.array_equal(scales[clear], want_s[clear]) and np.array_equal(zeros[clear], want_z[clear])
    assert np.isfinite(scales).all() and scales[7] == grids[0][0][7]  # the zero block keeps ratio 1.0's grid


def test_hessian_copies_the_rows_it_keeps():
    """A caller may refill one buffer between calls: the kept rows are copies."""
    rng = np.random.default_rng(2)
    buffer = np.empty((10, 4), np.float32)
    hessian, want = Hessian(4), np.zeros((4, 4))
    for _ in range(3):
        buffer[:] = rng.standard_normal((10, 4))
        hessian.add(buffer)
        want += buffer.astype(np.float64).T @ buffer
    np.testing.assert_allclose(hessian.h, want, rtol=1e-5, atol=1e-5)
