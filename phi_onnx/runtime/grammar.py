"""Constrained decoding with llguidance: JSON schema, any JSON object, regex and Lark grammars.

A `Constraint` is what a request asks for (compiled to llguidance's grammar text and validated once);
`Model.grammar(constraint)` (or `GrammarProcessor(constraint, tokenizer, vocab_size)`) binds it to a
model's tokenizer. The GrammarProcessor goes into `GenerationOptions.logits_processors`; each
`SequenceState` calls its `for_sequence()` (see `bind_processors`), so every sequence — in a static
batch or in the server's Scheduler — gets its own matcher, a copy of one compiled template.

Per step, the sequence's matcher consumes the tokens chosen since its last call (the processor sees
the token ids so far), computes the mask of allowed next tokens (a bitmask, 1 bit per token) and
sets every other score to -inf. When the grammar is complete, the mask allows only the model's EOS
ids, so the reply ends there ("eos"); a reply cut by max_new_tokens ends "length" as always.

For several rows at once, `fill_masks` computes their masks in one llguidance call that spreads the
rows over its thread pool (`LLExecutor.unsafe_compute_mask_ptr`); the processors then use those masks.
Fast-forward: where the grammar forces the next tokens (a schema's fixed keys and punctuation,
`","age":`), the mask would allow one token at a time. After each sampled token, `SequenceState.fast_forward`
takes them at once (`SequenceGrammar.forced_tokens`: llguidance's `compute_ff_tokens`), each through the
finish rule as if sampled, and the driver runs them through the model in one batch-1 run over the held
prefix (`DecodeCore.extend`; the Scheduler counts it against its prefill budget) instead of one decode step
each. Not with `logprobs` (each token needs its own logits) or with other logits processors beside the grammar.

A schema with a keyword llguidance cannot enforce is refused with OptionsError naming the keyword
(`strict=True`, the default); with `strict=False` such keywords are ignored and listed in
`Constraint.warnings` (and logged), as OpenAI's non-strict mode promises no more than best effort.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from phi_onnx.runtime.errors import ModelFolderError, OptionsError
from phi_onnx.runtime.options import bind_processors

log = logging.getLogger(__name__)

__all__ = ["Constraint", "GrammarProcessor", "SequenceGrammar", "apply_mask", "bind_processors", "constraint_from",
           "fill_masks", "grammar_tokenizer", "json_object", "json_schema", "lark", "regex"]

INSTALL_HINT = "pip install llguidance (or phi-onnx[structured])."
#: Grammars larger than this (llguidance's text) are refused before compiling: a request must not
#: make the process compile for minutes.
MAX_GRAMMAR_CHARS = 1_000_000
#: JSON is written compactly ({"a":1,"b":[2,3]}): with llguidance's default, free whitespace between
#: tokens, a sampled reply can spend its whole budget on blank lines. A schema's own "x-guidance"
#: object may change this (llguidance applies it after these defaults).
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}


def _llg() -> Any:
    try:
        import llguidance
    except ImportError as error:  # pragma: no cover - a core dependency; kept for stripped installs
        raise OptionsError("Structured output (json_schema, regex, grammar, tools) needs llguidance, "
                           "which is not installed.", hint=INSTALL_HINT) from error
    return llguidance


@dataclass(frozen=True)
class Constraint:
    """A grammar a reply must match, in llguidance's grammar text (`source`), validated.

    Attributes:
        kind: "json_schema", "json_object", "regex" or "lark".
        source: llguidance's grammar (JSON text), what LLMatcher compiles.
        warnings: what llguidance ignores in a non-strict schema (empty when strict).
    """

    kind: str
    source: str
    warnings: tuple[str, ...] = field(default=())


def json_schema(schema: Mapping[str, Any] | str | bool, *, strict: bool = True) -> Constraint:
    """A reply that is one JSON value valid against `schema` (a dict, its JSON text, or True/False).

    Raises OptionsError for a schema that is not JSON, is not a schema, refers to nothing (`$ref`), or
    (strict) uses a keyword llguidance cannot enforce — naming it.
    """
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as error:
            raise OptionsError(f"The JSON schema is not valid JSON ({error}).",
                               hint="Pass a schema such as {\"type\": \"object\", \"properties\": {...}}.") from error
    if schema is True:
        schema = {}
    if not isinstance(schema, Mapping):
        raise OptionsError(f"A JSON schema is an object, not {type(schema).__name__} {schema!r:.60}.",
                           hint='Pass e.g. {"type": "object", "properties": {"name": {"type": "string"}}}.')
    try:
        source = _llg().LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_LAYOUT,
                                                           overrides=None if strict else {"lenient": True})
    except (ValueError, TypeError) as error:
        raise OptionsError(f"The JSON schema cannot be used: {error}.", hint="Check the schema.") from error
    return _validated("json_schema", source)


def json_object() -> Constraint:
    """A reply that is one JSON object (OpenAI's `response_format: {"type": "json_object"}`)."""
    return json_schema({"type": "object"})


def regex(pattern: str) -> Constraint:
    """A reply that matches `pattern` as a whole (Rust `regex` syntax: no look-around or back-references)."""
    if not isinstance(pattern, str) or not pattern:
        raise OptionsError(f"regex takes a non-empty pattern string (got {pattern!r:.60}).",
                           hint=r"Pass e.g. regex=r'\d{3}-\d{4}'.")
    return _validated("regex", _llg().LLMatcher.grammar_from_regex(pattern))


def lark(grammar: str) -> Constraint:
    """A reply in the language of a Lark grammar (llguidance's dialect: `start: ...`, /regex/ terminals,
    `%json {...}` for an embedded schema)."""
    if not isinstance(grammar, str) or not grammar.strip():
        raise OptionsError(f"grammar takes the text of a Lark grammar (got {grammar!r:.60}).",
                           hint='Pass e.g. grammar=\'start: "yes" | "no"\'.')
    return _validated("lark", _llg().LLMatcher.grammar_from_lark(grammar))


def constraint_from(*, json_schema: Any = None, regex: str | None = None, grammar: str | Constraint | None = None,
                    json_object: bool = False, strict: bool = True) -> Constraint | None:
    """The one constraint the keyword arguments ask for (None when none); OptionsError for several.

    `grammar` is Lark text or an already built Constraint (e.g. `tools.tool_call_constraint`).
    """
    asked = {name: value for name, value in (("json_schema", json_schema), ("regex", regex), ("grammar", grammar),
                                             ("json_object", json_object or None)) if value is not None}
    if len(asked) > 1:
        raise OptionsError(f"Only one of json_schema, regex, grammar, json_object may be given (got "
                           f"{', '.join(asked)}).", hint="Express both in one Lark grammar if you need to.")
    if json_schema is not None:
        return _module_json_schema(json_schema, strict=strict)
    if regex is not None:
        return _module_regex(regex)
    if isinstance(grammar, Constraint):
        return grammar
    if grammar is not None:
        return lark(grammar)
    return _module_json_object() if json_object else None


# The keyword arguments above shadow the module's functions of the same names.
_module_json_schema, _module_regex, _module_json_object = json_schema, regex, json_object


def _validated(kind: str, source: str) -> Constraint:
    if len(source) > MAX_GRAMMAR_CHARS:
        raise OptionsError(f"The {kind} is too large ({len(source)} characters compiled; the limit is "
                           f"{MAX_GRAMMAR_CHARS}).", hint="Use a smaller schema or grammar.")
    is_error, messages = _llg().LLMatcher.validate_grammar_with_warnings(source)
    if is_error:
        raise OptionsError(f"The {kind.replace('_', ' ')} cannot be enforced: {_describe(messages[0])}",
                           hint=_hint(kind, messages[0]))
    # Validation has no tokenizer, so it cannot check special tokens (`<|tool_call|>`); binding to the model
    # (GrammarProcessor) compiles against the tokenizer and refuses an unknown one, so this is no warning.
    messages = [m for m in messages if "no tokenizer" not in m]
    if messages:
        log.warning("%s: not enforced: %s", kind, "; ".join(messages))
    return Constraint(kind, source, tuple(messages))


def _describe(message: str) -> str:
    # llguidance's "Unimplemented keys: [\"uniqueItems\"]" names the keyword; say it plainly
    found = re.search(r"Unimplemented keys: \[(.*?)\]", message)
    if found:
        return f"the keyword(s) {found.group(1)} are not supported by the grammar engine (llguidance)."
    return message.strip()


def _hint(kind: str, message: str) -> str:
    if "Unimplemented keys" in message:
        return ("Remove those keywords from the schema, or pass strict=False to have them ignored "
                "(the rest of the schema is still enforced).")
    if kind == "regex":
        return "Use Rust regex syntax (no look-around, no back-references)."
    if kind == "lark":
        return "See llguidance's Lark syntax (docs/syntax.md): rules `name: ...`, terminals /regex/ or \"text\"."
    return "Check the schema."


# -- the model's tokenizer, for llguidance ----------------------------------------------------------
def grammar_tokenizer(folder: str | os.PathLike[str], vocab_size: int, eos_token_ids: Sequence[int]) -> Any:
    """llguidance's tokenizer (`LLTokenizer`) for an export's tokenizer.json, cached: building one takes
    about a second for a large vocabulary. Its vocabulary is the model's (`vocab_size`, which may be
    larger than the tokenizer's: the extra ids are never allowed), its EOS ids the model's."""
    path = Path(folder) / "tokenizer.json"
    try:
        stamp = path.stat().st_mtime_ns
    except OSError as error:
        raise ModelFolderError(f"{path} is missing; constrained decoding needs the tokenizer's JSON.",
                               hint="Export the model again.") from error
    return _tokenizer(str(path), stamp, int(vocab_size), tuple(int(t) for t in eos_token_ids))


@functools.lru_cache(maxsize=4)
def _tokenizer(path: str, stamp: int, vocab_size: int, eos: tuple[int, ...]) -> Any:
    del stamp  # part of the cache key only: a rewritten tokenizer.json is read again
    try:
        return _llg().LLTokenizer(Path(path).read_text(encoding="utf-8"), n_vocab=vocab_size,
                                  eos_token=list(eos) or None)
    except (ValueError, RuntimeError) as error:
        raise ModelFolderError(f"llguidance cannot read {path}: {error}",
                               hint="Constrained decoding needs a Hugging Face fast tokenizer.") from error


# -- the logits processors --------------------------------------------------------------------------
class GrammarProcessor:
    """A Constraint compiled for one model: put it in `logits_processors`; each sequence gets its own
    matcher through `for_sequence()` (SequenceState calls it), a copy of the template compiled here.

    Raises OptionsError when the grammar does not compile against this tokenizer.
    """

    def __init__(self, constraint: Constraint, tokenizer: Any, vocab_size: int) -> None:
        llg = _llg()
        self.constraint = constraint
        self.vocab = int(vocab_size)
        self.tokenizer = tokenizer
        self._template = llg.LLMatcher(tokenizer, constraint.source, log_level=0)
        if self._template.is_error():
            raise OptionsError(f"The {constraint.kind.replace('_', ' ')} cannot be enforced: "
                               f"{_describe(self._template.get_error())}",
                               hint=_hint(constraint.kind, self._template.get_error()))

    def for_sequence(self) -> SequenceGrammar:
        """A fresh matcher at the start of the grammar, for one sequence."""
        return SequenceGrammar(self._template.deep_copy(), self.vocab, self.constraint.kind)

    def __call__(self, token_ids: list[int], scores: np.ndarray) -> np.ndarray:
        # Shared by every sequence of a request, it has no state of its own to advance.
        raise RuntimeError("a GrammarProcessor must be bound per sequence (bind_processors) before sampling")


class SequenceGrammar:
    """One sequence's matcher, as a LogitsProcessor: consumes the tokens chosen since its last call,
    then masks every token the grammar does not allow next."""

    def __init__(self, matcher: Any, vocab_size: int, kind: str) -> None:
        self.matcher = matcher
        self.vocab = vocab_size
        self.kind = kind
        self.consumed: int | None = None  # how many of the sequence's token ids the matcher has seen
        self.words = (vocab_size + 31) // 32
        self._mask: np.ndarray | None = None  # a mask filled ahead (fill_masks) for the current position

    def advance(self, token_ids: Sequence[int]) -> None:
        """Feed the matcher the ids it has not seen (the first call only notes where the prompt ends)."""
        if self.consumed is None:
            self.consumed = len(token_ids)
            return
        for token in token_ids[self.consumed:]:
            if not self.matcher.consume_token(int(token)):
                raise OptionsError(f"Token {int(token)} does not fit the {self.kind.replace('_', ' ')} "
                                   f"({self.matcher.get_error() or 'not allowed'}).",
                                   hint="A logits processor after the grammar allowed a token the grammar forbids; "
                                        "put the grammar last.")
            self._mask = None
        self.consumed = len(token_ids)

    def allowed(self) -> np.ndarray:
        """The mask of allowed next tokens, as int32 words (bit i of word w: token 32 w + i)."""
        if self._mask is None:
            mask = np.empty((1, self.words), dtype=np.int32)
            self.matcher.unsafe_compute_mask_ptr(mask.ctypes.data, mask.nbytes)
            self._mask = mask[0]
        return self._mask

    def __call__(self, token_ids: list[int], scores: np.ndarray) -> np.ndarray:
        self.advance(token_ids)
        if self.matcher.is_error():
            raise OptionsError(f"The {self.kind.replace('_', ' ')} failed: {self.matcher.get_error()}",
                               hint="Simplify the grammar.")
        return apply_mask(self.allowed(), scores)

    def forced_tokens(self, token_ids: Sequence[int]) -> list[int]:
        """The tokens the grammar forces after `token_ids` (llguidance's fast-forward tokens: its forced
        bytes, tokenized, less a last token that could still grow). At each of them the mask allows that
        token alone, so taking them is what decoding them one by one would give. [] if none."""
        self.advance(token_ids)
        if self.matcher.is_error() or self.matcher.is_stopped():
            return []
        return [int(t) for t in self.matcher.compute_ff_tokens()]

    @property
    def done(self) -> bool:
        """Whether the grammar is complete (only EOS may follow)."""
        return bool(self.matcher.is_stopped())


_ALL = np.uint32(0xFFFFFFFF)
_BIT = np.arange(32, dtype=np.int64)


def _ids(words: np.ndarray, which: np.ndarray) -> np.ndarray:
    """The token ids of the set bits of `words[which]` (uint32 words, bit i of word w: token 32 w + i)."""
    bits = np.unpackbits(words[which].view(np.uint8).reshape(-1, 4), axis=1, bitorder="little").astype(bool)
    return (which[:, None] * 32 + _BIT)[bits]


def apply_mask(mask: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Set every score the mask (int32 words from llguidance) does not allow to -inf, in place.

    Works on the words, not on one flag per token: a grammar's mask is either sparse (a few keys or
    digits allowed) or dense (inside a string, almost everything), so only the words on the small
    side are unpacked. At 200k tokens that is ~0.05 ms a row where unpacking every bit took ~0.5 ms
    (benchmarks/grammar_cost.py).
    """
    vocab = scores.shape[-1]
    words = mask.view(np.uint32)[: (vocab + 31) // 32]
    some = np.flatnonzero(words)  # words allowing at least one token
    partial = np.flatnonzero(words != _ALL)  # words blocking at least one token
    if some.size <= partial.size:
        allowed = _ids(words, some)
        allowed = allowed[allowed < vocab]
        kept = scores[allowed]
        scores.fill(-np.inf)
        scores[allowed] = kept
        return scores
    blocked = _ids(~words, partial)
    scores[blocked[blocked < vocab]] = -np.inf
    return scores


@functools.lru_cache(maxsize=1)
def _executor() -> Any:
    return _llg().LLExecutor()


def fill_masks(rows: Sequence[tuple[Iterable[Any], Sequence[int]]]) -> int:
    """Compute the next-token masks of several sequences in one llguidance call (its thread pool).

    rows: (a sequence's bound logits processors, its token ids so far), for each sequence about to be
    sampled. The SequenceGrammar among each row's processors consumes its new tokens, and its mask is
    kept for its next call. Returns how many masks were filled (rows without a grammar are skipped).
    """
    grammars: list[SequenceGrammar] = []
    for processors, tokens in rows:
        for p in processors:
            if isinstance(p, SequenceGrammar):
                p.advance(tokens)
                if p._mask is None and not p.matcher.is_error():
                    grammars.append(p)
    if len(grammars) < 2:
        return len(grammars)  # one mask: the processor computes it itself, no pool hand-off
    words = grammars[0].words
    if any(g.words != words for g in grammars):
        raise RuntimeError("fill_masks: sequences of different vocabularies")  # a bug, not user input
    masks = np.empty((len(grammars), words), dtype=np.int32)
    _executor().unsafe_compute_mask_ptr([(g.matcher, i) for i, g in enumerate(grammars)], masks.ctypes.data,
                                        words * 4, len(grammars))
    for i, g in enumerate(grammars):
        g._mask = masks[i]
    return len(grammars)
