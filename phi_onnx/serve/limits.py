"""How many characters one token can stand for: a bound that refuses over-long prompts before tokenizing them.

Tokenizing a multi-megabyte prompt only to learn that it cannot fit costs seconds and hundreds of MB of
allocator memory that is not given back. Each token of a BPE or Unigram model is a string from its vocabulary,
matched against the text after the normalizer and pre-tokenizer; when those never shrink the text, a token
covers at most as many input characters as its string is long (a byte-level token's characters are
bytes, and every character is at least one byte). So a prompt longer than (tokens that fit) x (longest
token string) cannot fit, whatever its text, and is refused without being tokenized. Tokenizers that may
delete or merge text without bound (stripping, whitespace splitting, fused unknown runs) get no bound.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: Longest canonical decomposition of one character (U+1F82 is 4 characters in NFD): NFC and NFKC join at most
#: that many input characters into one (tests/serve/test_security.py checks it against unicodedata).
MAX_COMPOSED = 4
#: Normalizers that never make text shorter.
_KEEPS_LENGTH = {"NFD", "NFKD", "Lowercase", "Prepend", "ByteLevel"}
#: Pre-tokenizers that keep every character (they split, or map one character to one or more).
_KEEPS_TEXT = {"ByteLevel", "Metaspace", "Digits", "UnicodeScripts", "Split", "Punctuation"}


def max_chars_per_token(folder: Path) -> int | None:
    """The most input characters one token of `folder`'s tokenizer.json can cover, or None when unbounded."""
    try:
        data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        return _bound(data)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as error:  # an odd file: no bound, no harm
        log.debug("no characters-per-token bound for %s: %s", folder, error)
        return None


def _bound(data: dict[str, Any]) -> int | None:
    model = data["model"]
    kind = model.get("type")
    if kind == "BPE":
        if model.get("fuse_unk") and model.get("unk_token") and not model.get("byte_fallback"):
            return None  # a run of unknown characters of any length becomes one token
        pieces = list(model["vocab"])
    elif kind == "Unigram":
        if not model.get("byte_fallback"):
            return None  # unknown characters fuse into one token
        pieces = [entry[0] for entry in model["vocab"]]
    else:  # WordPiece and WordLevel map whole unknown words to one token
        return None
    added = [entry["content"] for entry in data.get("added_tokens") or ()]
    longest = max(len(piece) for piece in [*pieces, *added])
    factor = _normalizer_factor(data.get("normalizer"))
    if factor is None or not _keeps_text(data.get("pre_tokenizer")):
        return None
    return longest * factor


def _normalizer_factor(spec: dict[str, Any] | None) -> int | None:
    """How many input characters one normalized character can come from (None: unbounded)."""
    if spec is None:
        return 1
    kind = spec.get("type")
    if kind == "Sequence":
        factor = 1
        for inner in spec.get("normalizers") or ():
            step = _normalizer_factor(inner)
            if step is None:
                return None
            factor *= step
        return factor
    if kind in _KEEPS_LENGTH:
        return 1
    if kind in ("NFC", "NFKC"):
        return MAX_COMPOSED
    if kind == "Replace":
        pattern, content = spec.get("pattern") or {}, spec.get("content") or ""
        if "String" in pattern and content:
            return max(1, -(-len(pattern["String"]) // len(content)))
    return None  # Strip, StripAccents, BertNormalizer, Precompiled, Nmt, regex Replace: may delete text


def _keeps_text(spec: dict[str, Any] | None) -> bool:
    if spec is None:
        return True
    kind = spec.get("type")
    if kind == "Sequence":
        return all(_keeps_text(inner) for inner in spec.get("pretokenizers") or ())
    return kind in _KEEPS_TEXT and spec.get("behavior") != "Removed"
