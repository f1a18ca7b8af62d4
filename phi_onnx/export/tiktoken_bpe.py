"""tiktoken rank files → a Hugging Face byte-level BPE `tokenizer.json` that tokenizes the same way.

Phi-3-small's hub tokenizer is remote code around tiktoken's cl100k_base; `tokenizers`, transformers'
PreTrainedTokenizerFast and onnxruntime-genai all load the `tokenizer.json` written from it here.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from phi_onnx.errors import CheckpointError

#: tiktoken cl100k_base's pre-tokenizer pattern (the hub tokenizer uses `cl100k_base._pat_str`).
CL100K_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable character map (what byte-level BPE vocabularies use)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def read_tiktoken(path: Path) -> dict[bytes, int]:
    """A `.tiktoken` file (one `base64(token) rank` per line) as token bytes → rank."""
    ranks: dict[bytes, int] = {}
    for line in path.read_bytes().splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _merge_of(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The pair whose merge creates `token`: run BPE on its bytes with only lower-ranked merges."""
    rank = ranks[token]
    parts = [token[i:i + 1] for i in range(len(token))]
    while True:
        best, best_rank = None, None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < rank and (best_rank is None or r < best_rank):
                best, best_rank = i, r
        if best is None:
            break
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    if len(parts) != 2:
        raise CheckpointError(f"The tiktoken ranks cannot build token {token!r} from one merge.",
                              hint="The .tiktoken file is not a byte-level BPE vocabulary.")
    return parts[0], parts[1]


def tiktoken_tokenizer_json(ranks: dict[bytes, int], special_tokens: dict[str, int],
                            pattern: str = CL100K_PATTERN) -> dict[str, Any]:
    """A Hugging Face `tokenizer.json` equivalent to a tiktoken encoding (byte-level BPE).

    tiktoken merges the adjacent pair whose concatenation has the lowest rank; with the merges
    listed in rank order (each token's merge recovered by re-running BPE on its bytes), the
    `tokenizers` BPE model applies the same merges in the same order.
    """
    chars = _bytes_to_unicode()

    def text(token: bytes) -> str:
        return "".join(chars[b] for b in token)

    vocab = {text(token): rank for token, rank in ranks.items()}
    merges = [[text(a), text(b)] for a, b in (_merge_of(token, ranks) for token in
                                              sorted((t for t in ranks if len(t) > 1), key=ranks.__getitem__))]
    added = [{"id": i, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True}
             for content, i in sorted(special_tokens.items(), key=lambda item: item[1])]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": vocab, "merges": merges},
    }
