"""Checkpoint → ONNX export: a graph builder, one builder module per model family, a registry."""

from phi_onnx.export.options import ExportOptions
from phi_onnx.export.pipeline import ExportResult, export

__all__ = ["ExportOptions", "ExportResult", "export"]
