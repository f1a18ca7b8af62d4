"""User-facing errors: each names the problem and the fix, and the CLI prints it without a traceback."""

from __future__ import annotations


class PhiOnnxError(Exception):
    """Base class for errors caused by user input or the environment, not by a bug in phi-onnx."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n{self.hint}"


class SourceError(PhiOnnxError):
    """The model source (short name, hub id, folder) cannot be resolved."""


class CheckpointError(PhiOnnxError):
    """The checkpoint folder is missing files, holds unsafe formats, or is corrupt."""


class UnsupportedModelError(PhiOnnxError):
    """The architecture or one of its settings is not supported."""


class OptionsError(PhiOnnxError):
    """An option or a combination of options is invalid."""


class OutputExistsError(PhiOnnxError):
    """The output folder already exists and --overwrite was not given, or may not be replaced."""


class OutputWriteError(PhiOnnxError):
    """The output folder cannot be written: disk full, read-only, no permission, a file in the way."""
