"""What a verification feeds both models: the built-in prompts and text, files of them, and the settings."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

from phi_onnx.verify.errors import VerifyError

#: Prompts every verification runs (plus any from --prompts): code and prose, short and longer.
BUILTIN_PROMPTS: tuple[str, ...] = (
    "def read_json(path):\n    \"\"\"Return the object stored in the JSON file at path.",
    "The capital of France is",
    "Write a short poem about the sea.",
    "Return a new list containing the items of the iterable in ascending order. A custom key function can be",
)

#: The built-in perplexity text (sample.txt): documentation-style prose, the kind of text every Phi model (and
#: the bundled tiny-phi3, trained on Python docstrings) has seen plenty of. Written for phi-onnx.
SAMPLE_TEXT: str = files(__package__).joinpath("sample.txt").read_text(encoding="utf-8")


def read_prompts(path: str | os.PathLike[str]) -> list[str]:
    """Prompts from a file: a JSON list of strings (.json), else one prompt per non-empty line."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise VerifyError(f"Cannot read prompts from {file}: {error}.",
                          hint="Pass a UTF-8 text file, one prompt per line.") from error
    if file.suffix == ".json":
        try:
            prompts = json.loads(text)
        except json.JSONDecodeError as error:
            raise VerifyError(f"{file} is not valid JSON ({error}).",
                              hint="Use a JSON list of strings, or a .txt file with one prompt per line.") from error
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise VerifyError(f"{file} must hold a JSON list of strings.",
                              hint="For example: [\"first prompt\", \"second\\nprompt\"].")
        return [p for p in prompts if p.strip()]
    return [line for line in text.splitlines() if line.strip()]


def read_text(path: str | os.PathLike[str]) -> str:
    """The perplexity text from a file."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise VerifyError(f"Cannot read the perplexity text {path}: {error}.",
                          hint="Pass a UTF-8 text file with --text.") from error


@dataclass(frozen=True)
class VerifySettings:
    """What to run. Defaults: built-in prompts and text, 32 greedy tokens, 1024 text tokens in 256-token windows."""

    prompts: tuple[str, ...] = ()
    prompts_source: str = "builtin"
    use_builtin_prompts: bool = True
    text: str = SAMPLE_TEXT
    text_source: str = "builtin"
    new_tokens: int = 32
    text_tokens: int = 1024
    window: int = 256

    def __post_init__(self) -> None:
        if self.text_tokens < self.window:
            raise VerifyError(f"text_tokens ({self.text_tokens}) is less than one perplexity window ({self.window} "
                              "tokens), so no window fits and every verification would fail.",
                              hint="Raise the text tokens (--text-tokens, `verification.text_tokens`) or lower "
                                   "the window (--window, `verification.window`).")

    def key(self) -> dict[str, Any]:
        """What identifies these inputs (for the record, and to know whether a record is still current)."""
        prompts = (list(BUILTIN_PROMPTS) if self.use_builtin_prompts else []) + list(self.prompts)
        return {
            "prompts": len(prompts),
            "prompts_source": self.prompts_source,
            "prompts_sha256": hashlib.sha256(json.dumps(prompts).encode()).hexdigest(),
            "text_source": self.text_source,
            "text_sha256": hashlib.sha256(self.text.encode()).hexdigest(),
            "new_tokens": self.new_tokens,
            "text_tokens": self.text_tokens,
            "window": self.window,
        }
