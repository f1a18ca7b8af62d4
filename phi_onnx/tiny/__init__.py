"""A tiny, offline-trained Phi-3 checkpoint and the tokenizer builder behind it.

``TINY_PHI3_DIR`` is a Hugging Face model folder (``config.json``, bf16
``model.safetensors``, tokenizer files, ``heldout.txt``) of a ~4.5 M parameter
``Phi3ForCausalLM`` trained for a few minutes on Python stdlib docstrings; it
is not a real Phi.  Rebuild it with ``python -m phi_onnx.tiny.train --out DIR``.
``build_tokenizer`` makes a small Phi-3 or Phi-4 style tokenizer without network.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from phi_onnx.tiny.tokenizer import build_tokenizer

TINY_PHI3_DIR: Path = Path(__file__).resolve().parent / "tiny-phi3"

__all__ = ["TINY_PHI3_DIR", "build_tokenizer"]


def __getattr__(name: str) -> Any:
    # The tokenizer builder needs transformers (the `reference` extra); exporting or chatting with
    # the bundled model must not.
    if name == "build_tokenizer":
        from phi_onnx.tiny.tokenizer import build_tokenizer

        return build_tokenizer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
