"""phi-onnx: export Microsoft Phi checkpoints to optimized ONNX and run them with ONNX Runtime."""

from __future__ import annotations

__version__ = "0.1.0"

from phi_onnx.errors import PhiOnnxError
from phi_onnx.export import ExportOptions, ExportResult, export
from phi_onnx.runtime import GenerationResult, Model, load  # onnxruntime itself is imported on first load()

__all__ = ["ExportOptions", "ExportResult", "GenerationResult", "Model", "PhiOnnxError", "__version__", "export",
           "load"]
