"""Weight quantization: int4 blocks in MatMulNBits layout, by round-to-nearest, clip search or GPTQ."""

from phi_onnx.quantize.clip import quantize_clip
from phi_onnx.quantize.gptq import Hessian, quantize_gptq
from phi_onnx.quantize.int4 import Int4Weight, dequantize_int4, quantize_int4

__all__ = ["Hessian", "Int4Weight", "dequantize_int4", "quantize_clip", "quantize_gptq", "quantize_int4"]
