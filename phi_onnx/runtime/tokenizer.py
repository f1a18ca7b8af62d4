"""Text ↔ token ids with the `tokenizers` library (no torch, no transformers), plus streaming decode."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from phi_onnx.runtime.errors import ModelFolderError

#: The named special tokens transformers passes to chat templates (`special_tokens_map`).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


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
        as `tokenizer(text)` does in transformers; chat prompts pass False, as `apply_chat_template` does."""
        return list(self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """Text of `ids`, special tokens dropped by default."""
        return str(self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def token_to_id(self, token: str) -> int | None:
        """The id of a token string (e.g. "<|end|>"), or None."""
        return self._tokenizer.token_to_id(token)

    def stream(self) -> TokenStream:
        """A fresh incremental decoder."""
        return TokenStream(self._tokenizer)


def _read_optional_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelFolderError(f"{path} is not valid JSON ({error}).",
                               hint="Copy it from the source checkpoint again.") from error
    return data if isinstance(data, dict) else {}
