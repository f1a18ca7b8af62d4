"""phi-onnx: export Microsoft Phi checkpoints to optimized ONNX and run them with ONNX Runtime.

The public names are imported on first use (module `__getattr__`), so `import phi_onnx` and the CLI's
`--help` do not pay for onnx_ir, onnx, onnxruntime and numpy until something needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from phi_onnx.errors import PhiOnnxError
from phi_onnx.lazy import lazy_exports

__version__ = "0.1.0"

if TYPE_CHECKING:
    from phi_onnx.export.options import ExportOptions
    from phi_onnx.export.pipeline import ExportResult, export
    from phi_onnx.runtime.generation import GenerationResult
    from phi_onnx.runtime.model import Model, load

_LAZY = {
    "ExportOptions": "phi_onnx.export.options",
    "ExportResult": "phi_onnx.export.pipeline",
    "export": "phi_onnx.export.pipeline",
    "GenerationResult": "phi_onnx.runtime.generation",
    "Model": "phi_onnx.runtime.model",
    "load": "phi_onnx.runtime.model",
}

__all__ = ["ExportOptions", "ExportResult", "GenerationResult", "Model", "PhiOnnxError", "__version__", "export",
           "load"]


# Importing the subpackage sets the attribute `export` to it, hiding the function; import it now (cheap: its
# names are lazy too) and drop that attribute, so `phi_onnx.export` resolves to the function below.
importlib.import_module("phi_onnx.export")
del globals()["export"]


__getattr__ = lazy_exports(__name__, _LAZY)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
