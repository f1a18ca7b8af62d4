"""One sequence being generated: its tokens, its sampler, the finish rule, its text as it becomes final.

`Model` and the `Scheduler` both hold one `SequenceState` per request; each step hands it the
logits of its last token and gets back a `TokenEvent`. The finish rule lives here alone: an EOS id
of the model ("eos"), a stop string in the text ("stop"), or the token budget ("length"). Text is
decoded incrementally; while the end of the text could still be the start of a stop string it is
held back, so streamed pieces never show a stop string.

After `step`, `fast_forward` takes the tokens the sequence's grammar forces next (FAST_FORWARD_MAX at
most), each through the same finish rule, without logits; the driver then runs the sequence's new tokens
(the sampled one and those) through the model together.

`check_prompt` is the one rule for what prompt a request may have (not empty, ids in the
vocabulary, room left for a reply in `capacity`), with one set of messages.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from phi_onnx.runtime.errors import OptionsError, PromptTooLongError
from phi_onnx.runtime.options import GenerationOptions, bind_processors
from phi_onnx.runtime.sampling import Choice, Sampler
from phi_onnx.runtime.tokenizer import TextTokenizer

#: Whether sequences take the tokens their grammar forces without a model run each (`fast_forward`); an
#: internal switch, for comparisons (tests, benchmarks/grammar_ff.py).
FAST_FORWARD = True
#: Most forced tokens taken after one sampled token. With it, the run that computes them is at most this
#: + 1 tokens: the Scheduler always fits one such run in a step, and the library runs the same ones.
FAST_FORWARD_MAX = 32


@dataclass(frozen=True)
class TokenEvent:
    """One generated token: its id, the text it makes visible (may be ""), and optional log-probabilities."""

    token_id: int
    text: str
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class FinishEvent:
    """The end of a request. reason: "eos", "stop" (a stop string), "length", "cancelled" or "error"."""

    reason: str
    prompt_tokens: int
    completion_tokens: int
    text: str
    error: str | None = None
    cached_tokens: int = 0  # prompt tokens whose keys and values were reused or copied, not computed


Event = TokenEvent | FinishEvent


def check_prompt(ids: Sequence[int], vocab_size: int, capacity: int, max_new_tokens: int | None = None,
                 *, what: str = "The prompt", where: str = "the model's context") -> None:
    """Raise OptionsError / PromptTooLongError unless `ids` can start a reply within `capacity` tokens
    (with room for `max_new_tokens` when given, else for one token)."""
    if not ids:
        raise OptionsError(f"{what} is empty (0 tokens).", hint="Pass some text to continue.")
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise OptionsError(f"Token id {bad} is outside the vocabulary (0..{vocab_size - 1}).",
                           hint="Pass token ids from this model's tokenizer.")
    check_length(len(ids), capacity, max_new_tokens, what=what, where=where)


def check_length(prompt_tokens: int, capacity: int, max_new_tokens: int | None = None, *,
                 what: str = "The prompt", where: str = "the model's context") -> None:
    """Raise PromptTooLongError unless `prompt_tokens` leave room for `max_new_tokens` (or one token)."""
    reply = max_new_tokens or 1
    if prompt_tokens + reply > capacity:
        asked = f" + {max_new_tokens} to generate" if max_new_tokens else ", so no room is left for a reply"
        raise PromptTooLongError(
            f"{what} has {prompt_tokens} tokens{asked}; {where} is {capacity} tokens.",
            hint=f"Shorten it to at most {capacity - reply} tokens"
                 + (" or lower max_new_tokens / max_tokens." if max_new_tokens else
                    " (fewer to leave room for the reply)."))


@runtime_checkable
class ForcingProcessor(Protocol):
    """A per-sequence logits processor that can name the tokens it forces next (a grammar's matcher:
    `grammar.SequenceGrammar`), so they are taken without a model run each."""

    def __call__(self, token_ids: list[int], scores: np.ndarray) -> np.ndarray: ...

    def forced_tokens(self, token_ids: Sequence[int]) -> list[int]:
        """The tokens that must follow `token_ids` (the sequence so far), whatever the logits; [] if none."""
        ...


class TextAssembler:
    """Incremental text of one reply, cut at the first stop string, holding back possible stop prefixes."""

    def __init__(self, tokenizer: TextTokenizer, stops: Sequence[str]) -> None:
        self._stream = tokenizer.stream()
        self.stops = tuple(stops)
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add a token; returns the text that is now safe to show."""
        self.text += self._stream.step(token_id)
        hold = 0
        if self.stops:
            # A stop string cannot start before `emitted`: any prefix of one at the end was held back.
            hits = [i for stop in self.stops if (i := self.text.find(stop, self.emitted)) >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.stopped = True
                return self.flush()
            hold = self._held()
        piece = self.text[self.emitted: len(self.text) - hold]
        self.emitted += len(piece)
        return piece

    def _held(self) -> int:
        tail = self.text[self.emitted:]
        for size in range(min(len(tail), max(map(len, self.stops)) - 1), 0, -1):
            if any(stop.startswith(tail[-size:]) for stop in self.stops):
                return size
        return 0

    def flush(self) -> str:
        """Everything not shown yet."""
        piece = self.text[self.emitted:]
        self.emitted = len(self.text)
        return piece


class SequenceState:
    """A request's generation: prompt, generated ids, sampler, finish rule and text.

    Args:
        prompt: the prompt's token ids (checked by the caller with `check_prompt`).
        options: how to choose tokens and when to stop.
        budget: most tokens to generate (max_new_tokens, capped by the room left in the cache).
        tokenizer, eos_token_ids, vocab_size: the model's.
    """

    def __init__(self, prompt: Sequence[int], options: GenerationOptions, budget: int, *, tokenizer: TextTokenizer,
                 eos_token_ids: Sequence[int], vocab_size: int) -> None:
        self.prompt = [int(t) for t in prompt]
        if any(callable(getattr(p, "for_sequence", None)) for p in options.logits_processors):
            # a stateful processor (a grammar's matcher) must be this sequence's own, not the request's
            options = dataclasses.replace(options, logits_processors=bind_processors(options.logits_processors))
        self.options = options
        self.budget = budget
        self.eos = frozenset(eos_token_ids)
        self.sampler = Sampler(options, sorted(self.eos), self.prompt, vocab_size)
        self.assembler = TextAssembler(tokenizer, options.stop)
        self.generated: list[int] = []
        self.events: list[TokenEvent] = []  # kept only when log-probabilities are asked for
        self.finish_reason: str | None = None
        self.first_token_at: float | None = None
        #: the grammar that can name the tokens it forces, when this sequence fast-forwards them
        self.forcing: ForcingProcessor | None = _forcing(self.options)

    @property
    def tokens(self) -> list[int]:
        """Prompt and generated ids."""
        return self.prompt + self.generated

    @property
    def done(self) -> bool:
        """Whether the finish rule has ended this sequence."""
        return self.finish_reason is not None

    def step(self, logits: np.ndarray) -> TokenEvent:
        """Choose the next token from its logits [vocab], apply the finish rule; the token's event.
        The driver then calls `fast_forward` for the tokens the grammar forces after it."""
        choice = self.sampler(logits, self.tokens if self.options.logits_processors else self.prompt,
                              len(self.generated))
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        return self._accept(choice)

    def fast_forward(self) -> list[TokenEvent]:
        """After `step`: take the tokens the grammar forces next (at most FAST_FORWARD_MAX), each through
        the finish rule as if sampled, so text, events, budget and stop strings are those of token-by-token
        decoding; the driver runs them through the model together. Empty when nothing is forced, the
        sequence is done, or it cannot fast-forward (`forcing` is None)."""
        if self.forcing is None or self.done:
            return []
        events = []
        for token in self.forcing.forced_tokens(self.tokens)[:FAST_FORWARD_MAX]:
            if token in self.eos or self.done:
                break  # EOS is the sampler's to choose (min_new_tokens); never past the finish rule
            events.append(self._accept(self.sampler.take(int(token))))
        return events

    def _accept(self, choice: Choice) -> TokenEvent:
        """Append a chosen token, apply the finish rule; its event."""
        token = choice.token
        self.generated.append(token)
        if token in self.eos:
            piece, self.finish_reason = self.assembler.flush(), "eos"
        else:
            piece = self.assembler.push(token)
            if self.assembler.stopped:
                self.finish_reason = "stop"
            elif len(self.generated) >= self.budget:
                self.finish_reason = "length"
                piece += self.assembler.flush()
        event = TokenEvent(token, piece, choice.logprob, choice.top)
        if self.options.logprobs:
            self.events.append(event)
        return event

    def text(self, *, finished: bool = True) -> str:
        """The reply's text: all of it, or (an interrupted reply) only what was shown."""
        return self.assembler.text if finished else self.assembler.text[: self.assembler.emitted]


def _forcing(options: GenerationOptions) -> ForcingProcessor | None:
    """The processor whose forced tokens a sequence may take without a model run: only when it is the one
    logits processor (another could rule a forced token out) and no log-probabilities are asked for (each
    token would need its own logits)."""
    if not FAST_FORWARD or options.logprobs or len(options.logits_processors) != 1:
        return None
    processor = options.logits_processors[0]
    return processor if isinstance(processor, ForcingProcessor) else None


def prepare_step(states: Sequence[SequenceState]) -> None:
    """Before `step` on several sequences: compute their grammars' masks together, in parallel
    (`phi_onnx.runtime.grammar.fill_masks`), instead of one after another inside each step."""
    rows = [(s.options.logits_processors, s.tokens) for s in states if s.options.logits_processors and not s.done]
    if len(rows) > 1:
        from phi_onnx.runtime.grammar import fill_masks

        fill_masks(rows)
