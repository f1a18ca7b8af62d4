"""Checkpoint → ONNX export: a graph builder, one builder module per model family, a registry.

`ExportOptions`, `ExportResult` and `export` are imported on first use, so reading the registry or the
options does not import onnx_ir.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from phi_onnx.lazy import lazy_exports

if TYPE_CHECKING:
    from phi_onnx.export.options import ExportOptions
    from phi_onnx.export.pipeline import ExportResult, export

_LAZY = {"ExportOptions": "phi_onnx.export.options", "ExportResult": "phi_onnx.export.pipeline",
         "export": "phi_onnx.export.pipeline"}

__all__ = ["ExportOptions", "ExportResult", "export"]


__getattr__ = lazy_exports(__name__, _LAZY)
