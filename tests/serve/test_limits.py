"""The characters-per-token bound that refuses over-long prompts before tokenizing: sound on real tokenizers
(no text has more characters than tokens x bound), None where a tokenizer can swallow text without bound."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from phi_onnx.serve.limits import MAX_COMPOSED, _bound, max_chars_per_token

tokenizers = pytest.importorskip("tokenizers")

TINY = Path(__file__).resolve().parents[2] / "phi_onnx" / "tiny" / "tiny-phi3"


def llama_style() -> dict[str, Any]:
    """A SentencePiece-style BPE as Llama/Phi-3 ship it: '▁' for spaces, byte fallback, fused unknowns."""
    pieces = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), "▁", "a", "b", "c", "▁a", "ab", "▁ab",
              "abc", "▁abc", "▁▁", "▁▁▁▁"]
    merges = ["▁ a", "a b", "▁a b", "ab c", "▁ab c", "▁ ▁", "▁▁ ▁▁"]
    return {"version": "1.0", "truncation": None, "padding": None,
            "added_tokens": [{"id": 0, "content": "<unk>", "single_word": False, "lstrip": False, "rstrip": False,
                              "normalized": False, "special": True},
                             {"id": len(pieces), "content": "<|assistant|>", "single_word": False, "lstrip": False,
                              "rstrip": False, "normalized": False, "special": True}],
            "normalizer": {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"},
                                                               {"type": "Replace", "pattern": {"String": " "},
                                                                "content": "▁"}]},
            "pre_tokenizer": None, "post_processor": None, "decoder": None,
            "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True,
                      "vocab": {p: i for i, p in enumerate(pieces)}, "merges": merges}}


texts = st.text(max_size=300) | st.lists(st.sampled_from(["<|endoftext|>", "<|assistant|>", "<|end|>", " ", "  ",
                                                          "ab", "abc", "\n", "é", "e\u0301", "🙂", "\ud7a3"]),
                                         max_size=60).map("".join)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(texts)
def test_no_text_has_more_characters_than_tokens_times_the_bound(text: str) -> None:
    for spec in (json.loads((TINY / "tokenizer.json").read_text(encoding="utf-8")), llama_style()):
        bound = _bound(spec)
        assert bound is not None
        tokenizer = tokenizers.Tokenizer.from_str(json.dumps(spec))
        count = len(tokenizer.encode(text, add_special_tokens=False).ids)
        assert len(text) <= max(count, 1) * bound, (text, count, bound)


def test_the_bound_of_the_bundled_tokenizer_is_its_longest_string() -> None:
    spec = json.loads((TINY / "tokenizer.json").read_text(encoding="utf-8"))
    longest = max(len(p) for p in [*spec["model"]["vocab"], *(t["content"] for t in spec["added_tokens"])])
    assert max_chars_per_token(TINY) == longest == 37


@pytest.mark.parametrize("change, expected", [
    (lambda s: s, 13),  # "<|assistant|>" is the longest string
    (lambda s: s.update(normalizer={"type": "NFC"}), 13 * MAX_COMPOSED),
    (lambda s: s.update(normalizer={"type": "Sequence", "normalizers": [{"type": "NFKC"}, {"type": "Lowercase"}]}),
     13 * MAX_COMPOSED),
    (lambda s: s.update(normalizer={"type": "Replace", "pattern": {"String": "  "}, "content": "▁"}), 26),
    (lambda s: s.update(pre_tokenizer={"type": "Metaspace", "replacement": "▁"}), 13),
    (lambda s: s.update(normalizer={"type": "Strip", "strip_left": True, "strip_right": True}), None),
    (lambda s: s.update(normalizer={"type": "StripAccents"}), None),
    (lambda s: s.update(normalizer={"type": "Replace", "pattern": {"String": " "}, "content": ""}), None),
    (lambda s: s.update(normalizer={"type": "Replace", "pattern": {"Regex": " +"}, "content": " "}), None),
    (lambda s: s.update(normalizer={"type": "Precompiled", "precompiled_charsmap": ""}), None),
    (lambda s: s.update(pre_tokenizer={"type": "Whitespace"}), None),
    (lambda s: s.update(pre_tokenizer={"type": "Split", "pattern": {"String": " "}, "behavior": "Removed"}), None),
    (lambda s: s["model"].update(byte_fallback=False), None),  # fused unknown runs: one token for any length
    (lambda s: s.update(model={"type": "WordPiece", "vocab": {"a": 0}, "unk_token": "[UNK]"}), None),
    (lambda s: s.update(model={"type": "Unigram", "vocab": [["a", 0.0]], "unk_id": 0}), None),
])
def test_tokenizers_that_may_swallow_text_get_no_bound(change: Any, expected: int | None) -> None:
    spec = llama_style()
    change(spec)
    assert _bound(spec) == expected


def test_an_unreadable_tokenizer_gives_no_bound(tmp_path: Path) -> None:
    assert max_chars_per_token(tmp_path) is None
    (tmp_path / "tokenizer.json").write_text("{not json")
    assert max_chars_per_token(tmp_path) is None
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": {}}}')
    assert max_chars_per_token(tmp_path) is None
