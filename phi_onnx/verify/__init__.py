"""Verify an export against its transformers reference: the same token ids through both, compared.

The package, by concern: `thresholds` (the limits, with the measurements they were set from), `inputs`
(built-in prompts, the sample text, files of them), `runners` (the export on ONNX Runtime, the reference
in transformers), `metrics` (the comparisons), `report` (the result and its table) and `core` (`verify()`).
The record is written into the folder's manifest (`phi_onnx.json`, field `verification`; see
`phi_onnx.manifest`), so every export carries its own quality record.

Importing this package is cheap: the names below are loaded from their modules on first use, so numpy,
onnxruntime and torch are imported only when a verification runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from phi_onnx.lazy import lazy_exports

if TYPE_CHECKING:
    from phi_onnx.manifest import MANIFEST, read_manifest, write_manifest
    from phi_onnx.verify.core import verify
    from phi_onnx.verify.errors import OnnxRunError, VerifyError
    from phi_onnx.verify.inputs import BUILTIN_PROMPTS, SAMPLE_TEXT, VerifySettings, read_prompts, read_text
    from phi_onnx.verify.metrics import compare_logits, log_softmax, nll
    from phi_onnx.verify.report import VerifyResult
    from phi_onnx.verify.runners import (
        REFERENCE_HINT,
        OnnxRunner,
        Reference,
        reference_info,
        require_reference_extra,
        resolve_reference,
    )
    from phi_onnx.verify.thresholds import (
        DEFAULT_THRESHOLDS,
        LOWER_BOUNDS,
        Check,
        Thresholds,
        default_thresholds,
        evaluate,
    )

#: Public name → the module that defines it.
_EXPORTS = {
    "verify": "phi_onnx.verify.core",
    "OnnxRunError": "phi_onnx.verify.errors",
    "VerifyError": "phi_onnx.verify.errors",
    "BUILTIN_PROMPTS": "phi_onnx.verify.inputs",
    "SAMPLE_TEXT": "phi_onnx.verify.inputs",
    "VerifySettings": "phi_onnx.verify.inputs",
    "read_prompts": "phi_onnx.verify.inputs",
    "read_text": "phi_onnx.verify.inputs",
    "compare_logits": "phi_onnx.verify.metrics",
    "log_softmax": "phi_onnx.verify.metrics",
    "nll": "phi_onnx.verify.metrics",
    "VerifyResult": "phi_onnx.verify.report",
    "REFERENCE_HINT": "phi_onnx.verify.runners",
    "OnnxRunner": "phi_onnx.verify.runners",
    "Reference": "phi_onnx.verify.runners",
    "reference_info": "phi_onnx.verify.runners",
    "require_reference_extra": "phi_onnx.verify.runners",
    "resolve_reference": "phi_onnx.verify.runners",
    "DEFAULT_THRESHOLDS": "phi_onnx.verify.thresholds",
    "LOWER_BOUNDS": "phi_onnx.verify.thresholds",
    "Check": "phi_onnx.verify.thresholds",
    "Thresholds": "phi_onnx.verify.thresholds",
    "default_thresholds": "phi_onnx.verify.thresholds",
    "evaluate": "phi_onnx.verify.thresholds",
    "MANIFEST": "phi_onnx.manifest",
    "read_manifest": "phi_onnx.manifest",
    "write_manifest": "phi_onnx.manifest",
}

__all__ = [
    "BUILTIN_PROMPTS",
    "DEFAULT_THRESHOLDS",
    "LOWER_BOUNDS",
    "MANIFEST",
    "REFERENCE_HINT",
    "SAMPLE_TEXT",
    "Check",
    "OnnxRunError",
    "OnnxRunner",
    "Reference",
    "Thresholds",
    "VerifyError",
    "VerifyResult",
    "VerifySettings",
    "compare_logits",
    "default_thresholds",
    "evaluate",
    "log_softmax",
    "nll",
    "read_manifest",
    "read_prompts",
    "read_text",
    "reference_info",
    "require_reference_extra",
    "resolve_reference",
    "verify",
    "write_manifest",
]


__getattr__ = lazy_exports(__name__, _EXPORTS)


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
