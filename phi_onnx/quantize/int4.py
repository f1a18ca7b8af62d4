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
