"""Text ↔ token ids with the `tokenizers` library (no torch, no transformers), plus streaming decode."""

from __future__ import annotations

import json
import numbers
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from phi_onnx.errors import OptionsError
from phi_onnx.runtime.errors import ModelFolderError

#: The named special tokens transformers passes to chat templates (`special_tokens_map`).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def check_text(text: str, what: str = "The text") -> str:
    """`text`, or OptionsError naming the first lone surrogate in it (e.g. "\\ud800").

    Such a string is not valid Unicode, so it has no UTF-8 form and no tokens (the tokenizers library
    raises a bare TypeError for it). `what` names the text in the message ("The prompt", "Message 2's content").
    """
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise OptionsError(
            f"{what} contains a lone surrogate ({text[error.start]!r}, U+{ord(text[error.start]):04X}) at character "
            f"{error.start}: that is not valid Unicode text, so it has no UTF-8 form and cannot be tokenized.",
            hint="Pass valid UTF-8 text: remove the surrogate, or fix its source (a JSON \\ud800 escape without "
                 "its pair, or bytes decoded with errors='surrogateescape'; decode with errors='replace').") from None
    return text


def is_token_id(value: Any) -> bool:
    """Whether `value` is an integer (Python or numpy), not a bool: something that may be a token id."""
    # numpy registers its integer types as numbers.Integral: they count, without importing numpy here
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_token_ids(ids: Sequence[Any], vocab_size: int, what: str = "token ids") -> list[int]:
    """`ids` as Python ints, or OptionsError for one that is not an integer or not in 0..vocab_size-1.

    `vocab_size` is the model's (genai_config's, the logits' width): ids the tokenizer lacks but the
    model can produce are allowed (they decode to ""), as they are in a prompt.
    """
    out = []
    for value in ids:
        if not is_token_id(value):
            raise OptionsError(f"{what.capitalize()} must be integers (got {type(value).__name__} {value!r:.40}).",
                               hint="Pass token ids from this model's tokenizer (e.g. result.token_ids).")
        if not 0 <= value < vocab_size:
            raise OptionsError(f"Token id {value} is outside the vocabulary (0..{vocab_size - 1}).",
                               hint="Pass token ids from this model's tokenizer.")
        out.append(int(value))
    return out


class TokenStream:
    """Turns generated ids into text pieces one id at a time, holding back partial UTF-8 characters."""

    def __init__(self, tokenizer: Any) -> None:
        from tokenizers.decoders import DecodeStream

        self._tokenizer = tokenizer
        self._stream = DecodeStream(skip_special_tokens=True)

    def step(self, token_id: int) -> str:
        """The text `token_id` completes ("" while a character is still incomplete, or for special tokens)."""
        return self._stream.step(self._tokenizer, token_id) or ""


class TextTokenizer:
    """The export's tokenizer.json, with the special tokens of tokenizer_config.json."""

    def __init__(self, folder: Path) -> None:
        from tokenizers import Tokenizer

        path = folder / "tokenizer.json"
        try:
            self._tokenizer = Tokenizer.from_file(str(path))
        except Exception as error:  # tokenizers raises a bare Exception for malformed files
            raise ModelFolderError(f"{path} cannot be read by the tokenizers library ({error}).",
                                   hint="Copy tokenizer.json from the source checkpoint again.") from error
        self.config = _read_optional_json(folder / "tokenizer_config.json")
        legacy = _read_optional_json(folder / "special_tokens_map.json")
        self.special_tokens: dict[str, str] = {}
        for name in SPECIAL_TOKEN_NAMES:
            value = self.config.get(name) or legacy.get(name)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                self.special_tokens[name] = value

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return int(self._tokenizer.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; `add_special_tokens` applies tokenizer.json's post-processor (e.g. BOS),
        as `tokenizer(text)` does in transformers; chat prompts pass False, as `apply_chat_template` does.

        Raises OptionsError for text with a lone surrogate (see `check_text`)."""
        check_text(text)
        return list(self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """Text of `ids`, special tokens dropped by default."""
        return str(self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def vocabulary(self) -> dict[str, int]:
        """{token: id}, added tokens included."""
        return self._tokenizer.get_vocab(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        """The id of a token string (e.g. "<|end|>"), or None."""
        return self._tokenizer.token_to_id(token)

    def stream(self) -> TokenStream:
        """A fresh incremental decoder."""
        return TokenStream(self._tokenizer)


def _read_optional_json(path: Path) -> dict[str, Any]:
    try:
        if not path.is_file():
            return {}
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as error:  # ValueError: not UTF-8, not JSON, 4,300+ digits
        raise ModelFolderError(f"{path} is not valid JSON ({str(error)[:200]}).",
                               hint="Copy it from the source checkpoint again.") from error
    return data if isinstance(data, dict) else {}
