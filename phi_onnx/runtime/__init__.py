"""Run exported models: `load()` a folder, then generate, stream or chat (onnxruntime-genai or plain ORT).

The names below are imported on first use, so importing one runtime module (e.g. `providers`) does
not import numpy, jinja2 and the rest.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from phi_onnx.lazy import lazy_exports

if TYPE_CHECKING:
    from phi_onnx.runtime.chat import ChatSession, ChatTemplate
    from phi_onnx.runtime.errors import DeviceError, ModelFolderError, NonFiniteLogitsError, PromptTooLongError
    from phi_onnx.runtime.generation import GenerationResult, TextStream
    from phi_onnx.runtime.model import Model, load
    from phi_onnx.runtime.options import GenerationOptions

_LAZY = {
    "ChatSession": "phi_onnx.runtime.chat", "ChatTemplate": "phi_onnx.runtime.chat",
    "DeviceError": "phi_onnx.runtime.errors", "ModelFolderError": "phi_onnx.runtime.errors",
    "PromptTooLongError": "phi_onnx.runtime.errors", "NonFiniteLogitsError": "phi_onnx.runtime.errors",
    "GenerationResult": "phi_onnx.runtime.generation",
    "TextStream": "phi_onnx.runtime.generation", "Model": "phi_onnx.runtime.model", "load": "phi_onnx.runtime.model",
    "GenerationOptions": "phi_onnx.runtime.options",
}

__all__ = ["ChatSession", "ChatTemplate", "DeviceError", "GenerationOptions", "GenerationResult", "Model",
           "ModelFolderError", "NonFiniteLogitsError", "PromptTooLongError", "TextStream", "load"]


__getattr__ = lazy_exports(__name__, _LAZY)
