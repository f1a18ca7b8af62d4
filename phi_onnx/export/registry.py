"""Hugging Face architecture name → builder class, one module per family, imported on demand.

The table below is the one place naming each architecture: a family module only defines its builder.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from phi_onnx.errors import UnsupportedModelError

if TYPE_CHECKING:
    from phi_onnx.export.base import DecoderBuilder

#: Which module and class build each architecture. Adding a family is adding a module and a line here.
ARCHITECTURE_MODULES: dict[str, str] = {
    "Phi3ForCausalLM": "phi_onnx.export.phi3:Phi3Builder",
    "PhiForCausalLM": "phi_onnx.export.phi2:Phi2Builder",
    "PhimoeForCausalLM": "phi_onnx.export.phimoe:PhimoeBuilder",
    "PhiMoEForCausalLM": "phi_onnx.export.phimoe:PhimoeBuilder",
    "Phi3SmallForCausalLM": "phi_onnx.export.phi3small:Phi3SmallBuilder",
}


def builder_for(architecture: str) -> type[DecoderBuilder]:
    """The builder class for an architecture; a clear error for anything we cannot build."""
    module = ARCHITECTURE_MODULES.get(architecture)
    if module is None:
        raise UnsupportedModelError(
            f"Architecture {architecture!r} is not supported. phi-onnx builds Microsoft Phi models only.",
            hint="Supported today: " + ", ".join(sorted(ARCHITECTURE_MODULES)) + ". See `phi-onnx models`.")
    name, _, cls = module.partition(":")
    builder: type[DecoderBuilder] = getattr(importlib.import_module(name), cls)
    return builder


def is_supported(architecture: str) -> bool:
    """Whether `architecture` has a builder."""
    return architecture in ARCHITECTURE_MODULES
