"""Block-wise int4 quantization in MatMulNBits' layout.

A weight W of shape [N, K] (out, in features, as stored in checkpoints) is cut into blocks of
`block_size` along K. Each block gets a scale (and with asymmetric quantization a zero point);
values are packed two per byte, low nibble first. ONNX Runtime's own C++ kernel does the rounding
when it is available, so our weights round exactly as ORT's quantizer would.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Int4Weight:
    """A weight in MatMulNBits form."""

    packed: np.ndarray  # uint8 [N, k_blocks, block_size // 2]
    scales: np.ndarray  # float32 [N * k_blocks]
    zero_points: np.ndarray | None  # uint8 [N * ceil(k_blocks / 2)], None when symmetric
    n: int
    k: int
    block_size: int


def quantize_int4(weight: np.ndarray, block_size: int = 32, symmetric: bool = True) -> Int4Weight:
    """Quantize `weight` [N, K] (float) to int4 blocks along K."""
    n, k = weight.shape
    k_blocks = -(-k // block_size)
    if k % block_size == 0:
        padded = np.ascontiguousarray(weight.T, dtype=np.float32)
    else:
        padded = np.zeros((k_blocks * block_size, n), dtype=np.float32)
        padded[:k] = weight.T
    packed = np.zeros((n, k_blocks, block_size // 2), dtype=np.uint8)
    scales = np.zeros((n, k_blocks), dtype=np.float32)
    zero_points = np.zeros((n, (k_blocks + 1) // 2), dtype=np.uint8)
    try:
        from onnxruntime.capi._pybind_state import quantize_matmul_4bits
    except ImportError:  # onnxruntime not installed: same rounding in numpy
        packed, scales, zero_points = _quantize_numpy(padded.T, block_size, symmetric)
    else:
        quantize_matmul_4bits(packed, padded, scales, zero_points, block_size, n, k_blocks * block_size,
                              symmetric)
    return Int4Weight(packed, scales.reshape(-1), None if symmetric else zero_points.reshape(-1),
                      n, k, block_size)


def _quantize_numpy(weight: np.ndarray, block_size: int,
                    symmetric: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fallback with ORT's rounding rules: symmetric uses [-8, 7] scaled by the signed extreme."""
    n, k = weight.shape
    blocks = weight.reshape(n, k // block_size, block_size)
    if symmetric:
        idx = np.abs(blocks).argmax(axis=2)[..., None]
        extreme = np.take_along_axis(blocks, idx, axis=2)[..., 0]
        scales = extreme / -8.0
        zero = np.full(scales.shape, 8, dtype=np.float32)
    else:
        lo = np.minimum(blocks.min(axis=2), 0.0)
        hi = np.maximum(blocks.max(axis=2), 0.0)
        scales = (hi - lo) / 15.0
        zero = np.clip(np.round(-lo / np.where(scales == 0, 1, scales)), 0, 15)
    safe = np.where(scales == 0, 1.0, scales)
    q = np.clip(np.round(blocks / safe[..., None]) + zero[..., None], 0, 15).astype(np.uint8)
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    zp = zero.astype(np.uint8)
    if zp.shape[1] % 2:
        zp = np.concatenate([zp, np.full((n, 1), 8, np.uint8)], axis=1)  # ORT pads with 8
    zp_packed = zp[:, 0::2] | (zp[:, 1::2] << 4)
    return packed, scales.astype(np.float32), zp_packed


def pack_int4(values: np.ndarray, scales: np.ndarray, zero: np.ndarray | None, k: int,
              block_size: int) -> Int4Weight:
    """MatMulNBits form of integer codes `values` [N, k_blocks * block_size] (0..15), `scales` and
    zero points `zero` [N, k_blocks] (None: symmetric, the kernel's implicit zero point 8)."""
    n = values.shape[0]
    blocks = values.reshape(n, -1, block_size).astype(np.uint8)
    packed = (blocks[..., 0::2] | (blocks[..., 1::2] << 4)).astype(np.uint8)
    zero_points = None
    if zero is not None:
        zp = zero.astype(np.uint8)
        if zp.shape[1] % 2:
            zp = np.concatenate([zp, np.full((n, 1), 8, np.uint8)], axis=1)  # as ORT pads
        zero_points = (zp[:, 0::2] | (zp[:, 1::2] << 4)).reshape(-1)
    return Int4Weight(packed, np.ascontiguousarray(scales, dtype=np.float32).reshape(-1), zero_points, n, k,
                      block_size)


def pad_columns(weight: np.ndarray, block_size: int, dtype: type = np.float32) -> np.ndarray:
    """`weight` [N, K] with zero columns appended up to a whole number of blocks."""
    n, k = weight.shape
    padded = -(-k // block_size) * block_size
    if padded == k:  # C order whatever the input's: float sums, and so near-ties, then break the same way
        return np.array(weight, dtype=dtype, order="C")
    out = np.zeros((n, padded), dtype=dtype)
    out[:, :k] = weight
    return out


def round_scales(scales: np.ndarray, scale_dtype: type) -> np.ndarray:
    """Scales as the kernel reads them (stored in `scale_dtype`), with zero replaced by a tiny value so
    codes stay finite; an all-zero block still dequantizes to (nearly) zero."""
    rounded = scales.astype(scale_dtype).astype(scales.dtype)
    tiny = np.finfo(scale_dtype).tiny
    return np.where(rounded == 0, np.asarray(tiny, dtype=scales.dtype), rounded)


def grid_params(blocks: np.ndarray, symmetric: bool, scale_dtype: type = np.float32,
                ratio: float | np.ndarray = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(scales, zero points) of round-to-nearest for `blocks` [..., block_size], ORT's rules, with the
    range shrunk by `ratio` (broadcast over the leading axes): symmetric maps the signed extreme to
    code 0 (value -8 x scale), asymmetric spreads [min(lo, 0), max(hi, 0)] over 15 steps."""
    if symmetric:
        idx = np.abs(blocks).argmax(axis=-1)[..., None]
        extreme = np.take_along_axis(blocks, idx, axis=-1)[..., 0]
        scales = round_scales(extreme * ratio / -8.0, scale_dtype)
        return scales, np.full(scales.shape, 8.0, dtype=blocks.dtype)
    lo = np.minimum(blocks.min(axis=-1), 0.0) * ratio
    hi = np.maximum(blocks.max(axis=-1), 0.0) * ratio
    scales = round_scales((hi - lo) / 15.0, scale_dtype)
    return scales, np.clip(np.round(-lo / scales), 0, 15)


def codes(blocks: np.ndarray, scales: np.ndarray, zero: np.ndarray) -> np.ndarray:
    """Integer codes 0..15 of `blocks` [..., block_size] on the grid (code - zero) x scale."""
    return np.clip(np.round(blocks / scales[..., None]) + zero[..., None], 0, 15)


def dequantize_int4(q: Int4Weight) -> np.ndarray:
    """The float weight [N, K] that MatMulNBits multiplies by: (q - zero_point) * scale."""
    k_blocks = q.packed.shape[1]
    values = np.empty((q.n, k_blocks, q.block_size), dtype=np.float32)
    values[..., 0::2] = q.packed & 0x0F
    values[..., 1::2] = q.packed >> 4
    if q.zero_points is None:
        zero = np.full((q.n, k_blocks), 8.0, dtype=np.float32)
    else:
        zp = q.zero_points.reshape(q.n, -1)
        unpacked = np.stack([zp & 0x0F, zp >> 4], axis=2).reshape(q.n, -1)
        zero = unpacked[:, :k_blocks].astype(np.float32)
    scales = q.scales.reshape(q.n, k_blocks)
    weight = (values - zero[..., None]) * scales[..., None]
    return weight.reshape(q.n, -1)[:, : q.k]
