"""Run exported models: `load()` a folder, then generate, stream or chat (onnxruntime-genai or plain ORT)."""

from __future__ import annotations

from phi_onnx.runtime.chat import ChatSession, ChatTemplate
from phi_onnx.runtime.errors import DeviceError, ModelFolderError, PromptTooLongError
from phi_onnx.runtime.generation import GenerationResult, TextStream
from phi_onnx.runtime.model import Model, load
from phi_onnx.runtime.sampling import GenerationOptions

__all__ = ["ChatSession", "ChatTemplate", "DeviceError", "GenerationOptions", "GenerationResult", "Model",
           "ModelFolderError", "PromptTooLongError", "TextStream", "load"]
