"""Weight quantization: block-wise int4 in MatMulNBits layout."""

from phi_onnx.quantize.int4 import Int4Weight, dequantize_int4, quantize_int4

__all__ = ["Int4Weight", "dequantize_int4", "quantize_int4"]
