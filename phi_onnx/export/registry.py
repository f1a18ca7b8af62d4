"""Hugging Face architecture name → builder class, one module per family, imported on demand."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from phi_onnx.errors import UnsupportedModelError

if TYPE_CHECKING:
    from phi_onnx.export.base import DecoderBuilder

#: Which module builds each architecture. Adding a family is adding a module and a line here.
ARCHITECTURE_MODULES: dict[str, str] = {
    "Phi3ForCausalLM": "phi_onnx.export.phi3",
    "PhiForCausalLM": "phi_onnx.export.phi2",
    "PhimoeForCausalLM": "phi_onnx.export.phimoe",
    "PhiMoEForCausalLM": "phi_onnx.export.phimoe",
    "Phi3SmallForCausalLM": "phi_onnx.export.phi3small",
}

_BUILDERS: dict[str, type[DecoderBuilder]] = {}
B = TypeVar("B", bound="type[DecoderBuilder]")


def register(*architectures: str) -> Callable[[B], B]:
    """Class decorator: this builder handles these `architectures[0]` names."""
    def decorate(cls: B) -> B:
        for name in architectures:
            _BUILDERS[name] = cls
        return cls
    return decorate


def builder_for(architecture: str) -> type[DecoderBuilder]:
    """The builder class for an architecture; a clear error for anything we cannot build."""
    module = ARCHITECTURE_MODULES.get(architecture)
    if module is None:
        raise UnsupportedModelError(
            f"Architecture {architecture!r} is not supported. phi-onnx builds Microsoft Phi models only.",
            hint="Supported today: " + ", ".join(sorted(ARCHITECTURE_MODULES)) + ". See `phi-onnx models`.")
    importlib.import_module(module)
    return _BUILDERS[architecture]


def is_supported(architecture: str) -> bool:
    """Whether `architecture` has a builder."""
    return architecture in ARCHITECTURE_MODULES
