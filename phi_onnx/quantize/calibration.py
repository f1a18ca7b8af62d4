"""Calibration text for data-aware int4 (GPTQ, weighted clip search): where it comes from, its tokens.

The built-in text (`calibration.txt`, ~24 kB of Python standard-library docstrings, none of them in
tiny-phi3's `heldout.txt` or verify's sample text) lets `--algo gptq` work offline; a model of
another domain calibrates better on its own text (`--calibration FILE`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from phi_onnx.errors import OptionsError
from phi_onnx.paths import expand_user

BUILTIN = Path(__file__).with_name("calibration.txt")
WINDOW = 256  #: tokens per calibration sequence
#: The default budget (`ExportOptions.calibration_tokens` overrides it). On tiny-phi3 (benchmarks/int4_quality.py)
#: gptq's KLD / rtn-32's at block 128 was 0.656 (SE 0.012) with 4096 tokens, 0.653 (0.013) with 6144 and 0.642
#: (0.012) with 8192; at block 32 0.477, 0.461 and 0.467 (0.014): the same within the error. Calibration time
#: grows with the tokens (on the 3.8B Phi-3-mini ~3/4 of gptq's time is calibration runs and Hessians).
MAX_TOKENS = 4096
MIN_TOKENS = 64


@dataclass(frozen=True)
class Calibration:
    """Tokenized calibration text, cut into equal windows."""

    ids: np.ndarray  # int64 [windows, length]
    source: str  # "built-in", a file path, or "<N texts>"
    sha256: str  # of the UTF-8 text, texts joined by blank lines

    @property
    def tokens(self) -> int:
        """How many tokens calibration runs on."""
        return int(self.ids.size)

    def record(self) -> dict[str, object]:
        """For the manifest."""
        return {"source": self.source, "sha256": self.sha256, "tokens": self.tokens,
                "windows": list(self.ids.shape)}


def calibration_text(spec: str | tuple[str, ...] | None) -> tuple[str, str]:
    """(text, source label) for a file path, a tuple of texts, or None (the built-in text)."""
    if spec is None:
        return BUILTIN.read_text(encoding="utf-8"), "built-in"
    if isinstance(spec, tuple):
        if not spec or not all(isinstance(t, str) for t in spec):
            raise OptionsError("Calibration texts must be a non-empty list of strings.",
                               hint="Pass a text file's path or a list of texts.")
        return "\n\n".join(spec), f"<{len(spec)} texts>"
    path = expand_user(spec, what="The calibration file", error=OptionsError)
    if not path.is_file():
        raise OptionsError(f"Calibration file {path} does not exist or is not a file.",
                           hint="Pass a UTF-8 text file, e.g. --calibration my_domain.txt.")
    try:
        return path.read_text(encoding="utf-8"), str(path.resolve())
    except UnicodeDecodeError as error:
        raise OptionsError(f"Calibration file {path} is not UTF-8 text ({error.reason} at byte {error.start}).",
                           hint="Pass a UTF-8 text file.") from None


def load_calibration(spec: str | tuple[str, ...] | None, tokenizer_json: Path,
                     max_tokens: int = MAX_TOKENS) -> Calibration:
    """Tokenize the calibration text with the model's tokenizer into windows of `WINDOW` tokens."""
    from tokenizers import Tokenizer

    text, source = calibration_text(spec)
    ids = Tokenizer.from_file(str(tokenizer_json)).encode(text, add_special_tokens=False).ids[:max_tokens]
    if len(ids) < MIN_TOKENS:
        raise OptionsError(f"The calibration text has {len(ids)} tokens; at least {MIN_TOKENS} are needed.",
                           hint="Pass a longer text (a few thousand tokens calibrate well).")
    length = min(WINDOW, len(ids))
    windows = np.asarray(ids[: len(ids) // length * length], dtype=np.int64).reshape(-1, length)
    return Calibration(windows, source, hashlib.sha256(text.encode("utf-8")).hexdigest())
