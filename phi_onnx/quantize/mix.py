"""Mixed precision: which projections of an int4 export to keep at 8 bits, by measured sensitivity.

A projection's sensitivity is measured where its error lands: `phi_onnx.quantize.sequential` runs each
decoder layer on calibration text once per linear, with only that linear in int4 and the rest in fp32, and
takes the squared error of the layer's output (the residual stream every later layer adds to) relative to
the fp32 layer's output. 8 bits would leave a share of that error, estimated from the two weight errors
weighted by each input's mean square (diag X^T X; at 8 bits the grid is 16 times finer, so the share is
about 1/256). The gain of 8 bits is the error removed; the cost, the bytes it adds. The projections with
the most gain per byte are kept at 8 bits (`MatMulNBits` with bits=8, round-to-nearest, the same block
size) until the budget is spent: a greedy knapsack.

On the trained fixtures the first layer's MLP down projection had by far the largest error, then the
attention output projections; with +10 % the mix took tiny-phi3's KLD from 0.57x to 0.33x of
onnxruntime-genai's builder int4 (the README's Quantization section has every fixture's figures).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from phi_onnx.quantize.embedding import dequantize_table, quantize_table, table_shapes
from phi_onnx.quantize.int4 import Int4Weight, dequantize_int4

#: Calibration tokens each layer's sensitivity runs use (whole windows, at least one): the ranking needs
#: far fewer tokens than GPTQ's Hessians, and each linear costs one run of its layer.
SENSITIVITY_TOKENS = 1024


@dataclass(frozen=True)
class Sensitivity:
    """What keeping one projection at 8 bits would buy, and cost."""

    int4_error: float  # the layer's output error with this projection alone in int4, relative to fp32's
    int8_share: float  # the share of that error 8 bits would leave
    extra_bytes: int  # bytes 8 bits add over 4 bits (weights and zero points; scales are the same)

    @property
    def gain(self) -> float:
        """The error 8 bits remove."""
        return self.int4_error * max(0.0, 1.0 - self.int8_share)


def bits_bytes(n: int, k: int, bits: int, block_size: int, symmetric: bool) -> int:
    """Bytes of an [n, k] weight's codes and zero points at `bits` (scales excluded: the same at 4 and 8)."""
    shapes = table_shapes(n, k, bits, block_size, symmetric)
    return int(np.prod(shapes["packed"])) + (int(np.prod(shapes["zero_points"])) if "zero_points" in shapes else 0)


def sensitivity(weight: np.ndarray, q4: Int4Weight, hessian: Any, int4_error: float, options: Any) -> Sensitivity:
    """The `Sensitivity` of `weight` [N, K] given its int4 form `q4`, the Hessian of its inputs (a
    `phi_onnx.quantize.gptq.Hessian`) and the measured relative output error `int4_error`."""
    n, k = weight.shape
    diag = np.diag(hessian.sum32).astype(np.float64)[:k]
    err4 = np.square(dequantize_int4(q4) - weight, dtype=np.float64).sum(axis=0) @ diag
    q8 = quantize_table(weight, 8, options.block_size, options.symmetric)
    err8 = np.square(dequantize_table(q8) - weight, dtype=np.float64).sum(axis=0) @ diag
    share = float(err8 / err4) if err4 > 0 else 1.0
    extra = bits_bytes(n, k, 8, options.block_size, options.symmetric) - \
        bits_bytes(n, k, 4, options.block_size, options.symmetric)
    return Sensitivity(float(int4_error), share, extra)


def choose_eight_bit(sensitivities: dict[str, Sensitivity], budget_bytes: float) -> list[str]:
    """The projections to keep at 8 bits: by gain per added byte, best first, each that still fits."""
    ranked = sorted(sensitivities, key=lambda key: sensitivities[key].gain / max(sensitivities[key].extra_bytes, 1),
                    reverse=True)
    chosen, spent = [], 0
    for key in ranked:
        s = sensitivities[key]
        if s.gain > 0 and spent + s.extra_bytes <= budget_bytes:
            chosen.append(key)
            spent += s.extra_bytes
    return chosen


def mix_record(sensitivities: dict[str, Sensitivity], chosen: list[str], base_bytes: int, budget: float,
               tokens: int) -> dict[str, Any]:
    """The manifest's record of a mixed-precision choice (`quantization.mix`)."""
    added = sum(sensitivities[key].extra_bytes for key in chosen)
    return {
        "method": "auto",
        "budget": budget,
        "base_bytes": base_bytes,
        "added_bytes": added,
        "added_fraction": round(added / base_bytes, 6) if base_bytes else 0.0,
        "sensitivity_tokens": tokens,
        "eight_bit": sorted(chosen),
        "tensors": {key: {"bits": 8 if key in chosen else 4, "int4_error": s.int4_error,
                          "int8_share": s.int8_share, "extra_bytes": s.extra_bytes}
                    for key, s in sensitivities.items()},
    }
