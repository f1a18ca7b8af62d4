"""Block-quantized tables that ORT's `GatherBlockQuantized` and `MatMulNBits` both read.

A table W [N, K] (vocab × hidden for an embedding or an LM head) is cut into blocks of
`block_size` along K, as MatMulNBits cuts its weights. Measured on ONNX Runtime 1.32 (one-node
sessions, tests/export/test_int4_embeddings.py):

- MatMulNBits wants B as uint8 [N, n_blocks, block_size * bits / 8], scales [N * n_blocks] or
  [N, n_blocks], zero points uint8 [N, ceil(n_blocks / 2)] at 4 bits (two per byte, low nibble
  first) or [N, n_blocks] at 8 bits; absent zero points mean 8 (4 bits) or 128 (8 bits).
- GatherBlockQuantized with uint8 data (bits 4 or 8) needs gather_axis 0, quantize_axis last and
  scales of the data's rank: data [N, K * bits / 8], scales [N, n_blocks], zero points packed the
  same way, the same defaults. Its rows dequantize to `(q - zero) * scale`, bit for bit.

So the bytes coincide: the embedding reads the LM head's B through a Reshape to 2-D and its
scales and zero points as they are. MatMulNBits refuses a 2-D B (its PrePack checks the
attribute-derived shape) and a rank-3 scales tensor, so a Reshape is needed on one side.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from phi_onnx.quantize.int4 import quantize_int4


@dataclass(frozen=True)
class QuantizedTable:
    """A [n, k] table in MatMulNBits layout at 4 or 8 bits."""

    packed: np.ndarray  # uint8 [n, n_blocks, block_size * bits // 8]
    scales: np.ndarray  # float32 [n, n_blocks]
    zero_points: np.ndarray | None  # uint8 [n, ceil(n_blocks / 2)] (4 bits) or [n, n_blocks] (8 bits)
    bits: int
    block_size: int
    k: int

    @property
    def n(self) -> int:
        """Rows (vocabulary size)."""
        return int(self.packed.shape[0])

    @property
    def n_blocks(self) -> int:
        """Blocks per row (K padded up to a whole block)."""
        return int(self.packed.shape[1])


def table_shapes(n: int, k: int, bits: int, block_size: int, symmetric: bool) -> dict[str, tuple[int, ...]]:
    """Shapes of the packed table, its scales and zero points (absent when symmetric)."""
    n_blocks = -(-k // block_size)
    shapes = {"packed": (n, n_blocks, block_size * bits // 8), "scales": (n, n_blocks)}
    if not symmetric:
        shapes["zero_points"] = (n, (n_blocks + 1) // 2 if bits == 4 else n_blocks)
    return shapes


def quantize_table(weight: np.ndarray, bits: int, block_size: int, symmetric: bool, *, clip: bool = False,
                   scale_dtype: type = np.float32) -> QuantizedTable:
    """Quantize `weight` [n, k] to `bits` (4 or 8) in blocks along k.

    4 bits rounds exactly as the linear layers do (ORT's kernel via `quantize_int4`, or with `clip` the
    clip search for scales stored in `scale_dtype`), so a tied table shared with the LM head is the table
    an untied int4 head would have. 8 bits always rounds to nearest (its error is ~1/256 of int4's).
    """
    n, k = weight.shape
    if bits == 4:
        from phi_onnx.quantize.clip import quantize_clip

        q = quantize_clip(weight, block_size, symmetric, scale_dtype=scale_dtype) if clip \
            else quantize_int4(weight, block_size, symmetric)
        zp = None if q.zero_points is None else q.zero_points.reshape(n, -1)
        return QuantizedTable(q.packed, q.scales.reshape(n, -1), zp, 4, block_size, k)
    if bits != 8:
        raise ValueError(f"bits must be 4 or 8, not {bits}")
    n_blocks = -(-k // block_size)
    blocks = np.zeros((n, n_blocks * block_size), dtype=np.float32)
    blocks[:, :k] = weight
    blocks = blocks.reshape(n, n_blocks, block_size)
    if symmetric:
        # ±127 around the kernels' default zero point 128: no value clips.
        scales = np.abs(blocks).max(axis=2) / 127.0
        zero = np.full(scales.shape, 128.0, dtype=np.float32)
    else:
        lo = np.minimum(blocks.min(axis=2), 0.0)
        hi = np.maximum(blocks.max(axis=2), 0.0)
        scales = (hi - lo) / 255.0
        zero = np.clip(np.round(-lo / np.where(scales == 0, 1, scales)), 0, 255)
    safe = np.where(scales == 0, 1.0, scales)
    values = np.clip(np.round(blocks / safe[..., None]) + zero[..., None], 0, 255).astype(np.uint8)
    return QuantizedTable(values, scales.astype(np.float32), None if symmetric else zero.astype(np.uint8),
                          8, block_size, k)


def dequantize_table(q: QuantizedTable) -> np.ndarray:
    """The float table [n, k] both kernels compute with: (q - zero point) * scale."""
    n, n_blocks, bs = q.n, q.n_blocks, q.block_size
    if q.bits == 4:
        values = np.empty((n, n_blocks, bs), dtype=np.float32)
        values[..., 0::2] = q.packed & 0x0F
        values[..., 1::2] = q.packed >> 4
    else:
        values = q.packed.astype(np.float32)
    if q.zero_points is None:
        zero = np.full((n, n_blocks), 2.0 ** (q.bits - 1), dtype=np.float32)
    elif q.bits == 4:
        zero = np.stack([q.zero_points & 0x0F, q.zero_points >> 4], axis=2).reshape(n, -1)[:, :n_blocks]
    else:
        zero = q.zero_points
    table = (values - zero.astype(np.float32)[..., None]) * q.scales[..., None]
    return table.reshape(n, -1)[:, : q.k]
