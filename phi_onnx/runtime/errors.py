"""Errors the runtime raises for bad folders, devices, prompts and options (all PhiOnnxError)."""

from __future__ import annotations

from phi_onnx.errors import OptionsError, PhiOnnxError

__all__ = ["DeviceError", "ModelFolderError", "NonFiniteLogitsError", "OptionsError", "PromptTooLongError"]


class ModelFolderError(PhiOnnxError):
    """The folder is not a usable export: missing or corrupt model, config or tokenizer."""


class DeviceError(PhiOnnxError):
    """The requested device or execution provider cannot be used."""


class PromptTooLongError(PhiOnnxError):
    """The prompt does not fit in the model's context."""


class NonFiniteLogitsError(PhiOnnxError):
    """The model computed NaN or infinite logits (corrupt or overflowing weights): no token can be chosen."""
