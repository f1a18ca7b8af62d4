"""What verification raises when it cannot run (all PhiOnnxError, so the CLI prints them without a traceback)."""

from __future__ import annotations

from phi_onnx.errors import PhiOnnxError


class VerifyError(PhiOnnxError):
    """Verification cannot run (missing extra, incompatible reference, unreadable inputs)."""


class OnnxRunError(VerifyError):
    """ONNX Runtime cannot load or run the export on the chosen provider (e.g. a CUDA export's kernel that
    the CPU provider lacks)."""
