"""phi-onnx: export Microsoft Phi checkpoints to optimized ONNX and run them with ONNX Runtime."""

from __future__ import annotations

__version__ = "0.1.0"

from phi_onnx.errors import PhiOnnxError
from phi_onnx.export import ExportOptions, ExportResult, export

__all__ = ["ExportOptions", "ExportResult", "PhiOnnxError", "__version__", "export", "load"]


def __getattr__(name: str) -> object:
    # `load` pulls in onnxruntime; import it only when asked for
    if name == "load":
        from phi_onnx.runtime import load

        return load
    raise AttributeError(f"module 'phi_onnx' has no attribute {name!r}")
