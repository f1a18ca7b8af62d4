"""The decoding loop both backends share: prefill, pick, stop, stream.

One `Generation` runs one prompt (or a batch on the ort backend). Each step asks the engine for
the last logits, picks the next token with the `Sampler`, and checks, per row, EOS ids, stop
strings and the token budget. Text is decoded incrementally; while the end of the text could
still be the start of a stop string it is held back, so streamed pieces never show a stop string.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from phi_onnx.runtime.engine import CachedEngine
from phi_onnx.runtime.errors import OptionsError, PromptTooLongError
from phi_onnx.runtime.sampling import GenerationOptions, Sampler
from phi_onnx.runtime.tokenizer import TextTokenizer

log = logging.getLogger(__name__)


@dataclass
class GenerationResult:
    """One reply.

    Attributes:
        text: the reply (special tokens dropped; ends before a stop string).
        token_ids: generated ids (the EOS id that ended it included, as transformers returns it).
        finish_reason: "eos", "stop" (a stop string), "length" (max_new_tokens or the context) or
            "interrupted".
        first_token_seconds: time to the first token (prompt processing); `seconds` is the total.
        cached_tokens: prompt tokens whose KV cache was reused from the previous call.
    """

    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str
    seconds: float
    first_token_seconds: float
    provider: str
    backend: str
    cached_tokens: int = 0
    recomputes: int = 0

    @property
    def new_tokens(self) -> int:
        """Number of generated tokens."""
        return len(self.token_ids)

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens per second after the first token (0.0 when there is only one)."""
        span = self.seconds - self.first_token_seconds
        return (self.new_tokens - 1) / span if self.new_tokens > 1 and span > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """The `generate --json` fields."""
        return {"text": self.text, "token_ids": self.token_ids, "provider": self.provider, "backend": self.backend,
                "prompt_tokens": self.prompt_tokens, "new_tokens": self.new_tokens,
                "seconds": round(self.seconds, 4), "first_token_seconds": round(self.first_token_seconds, 4),
                "finish_reason": self.finish_reason}

    def __str__(self) -> str:
        return self.text


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


@dataclass
class _Row:
    prompt: list[int]
    budget: int
    assembler: TextAssembler
    generated: list[int] = field(default_factory=list)
    finish_reason: str | None = None


class Generation:
    """One run of the loop over one prompt (any backend) or a batch (engines with max_batch > 1)."""

    def __init__(self, engine: CachedEngine, tokenizer: TextTokenizer, prompts: Sequence[Sequence[int]],
                 options: GenerationOptions, eos_token_ids: Sequence[int], context_length: int,
                 vocab_size: int) -> None:
        self.engine = engine
        self.options = options
        self.eos = frozenset(eos_token_ids)
        self.context_length = context_length
        rows = []
        for i, prompt in enumerate(prompts):
            if not prompt:
                raise OptionsError("The prompt is empty (0 tokens).", hint="Pass some text to continue.")
            if len(prompt) >= context_length:
                which = f"Prompt {i}" if len(prompts) > 1 else "The prompt"
                raise PromptTooLongError(
                    f"{which} has {len(prompt)} tokens; the model's context is {context_length} tokens, "
                    "so no room is left for a reply.",
                    hint=f"Shorten it to at most {context_length - 1} tokens (fewer to leave room for the reply).")
            bad = [t for t in prompt if not 0 <= int(t) < vocab_size]
            if bad:
                raise OptionsError(f"Token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1}).",
                                   hint="Pass token ids from this model's tokenizer.")
            budget = min(options.max_new_tokens, context_length - len(prompt))
            if budget < options.max_new_tokens:
                log.info("Only %d of max_new_tokens=%d fit the %d-token context after the %d-token prompt.",
                         budget, options.max_new_tokens, context_length, len(prompt))
            rows.append(_Row([int(t) for t in prompt], budget, TextAssembler(tokenizer, options.stop)))
        self.rows = rows
        self.sampler = Sampler(options, sorted(self.eos), [r.prompt for r in rows], vocab_size)
        self.started = 0.0
        self.first_token_at = 0.0
        self.ended = 0.0
        self.cached_tokens = 0
        self.recomputes_before = engine.recomputes

    def pieces(self) -> Iterator[str]:
        """Run the loop, yielding row 0's text as it becomes final."""
        engine, rows = self.engine, self.rows
        self.started = time.perf_counter()
        if len(rows) == 1:
            row = rows[0]
            engine.prepare(1, len(row.prompt) + row.budget)
            self.cached_tokens = engine.reusable(row.prompt)
            logits = engine.extend(row.prompt)[None]
        else:
            # Finished rows keep being fed (their output ignored), so every row needs the longest run.
            engine.prepare(len(rows), max(len(r.prompt) for r in rows) + max(r.budget for r in rows))
            logits = engine.forward_rows([r.prompt for r in rows], [0] * len(rows))
        fed = np.array([len(r.prompt) for r in rows])
        step = 0
        while True:
            chosen = self.sampler(logits, step)
            if step == 0:
                self.first_token_at = time.perf_counter()
            step += 1
            self.sampler.observe(chosen)
            for b, row in enumerate(rows):
                if row.finish_reason is None:
                    piece = self._add(row, int(chosen[b]))
                    if b == 0 and piece:
                        yield piece
            if all(r.finish_reason for r in rows):
                break
            if len(rows) == 1:
                logits = engine.extend(rows[0].prompt + rows[0].generated)[None]
            else:
                logits = engine.forward_rows([[int(t)] for t in chosen], fed.tolist())
                fed += 1
        self.ended = time.perf_counter()

    def _add(self, row: _Row, token: int) -> str:
        row.generated.append(token)
        if token in self.eos:
            row.finish_reason = "eos"
            return row.assembler.flush()
        piece = row.assembler.push(token)
        if row.assembler.stopped:
            row.finish_reason = "stop"
        elif len(row.generated) >= row.budget:
            row.finish_reason = "length"
            piece += row.assembler.flush()
        return piece

    def results(self) -> list[GenerationResult]:
        """One result per prompt; rows still running (an interrupted stream) end as "interrupted"."""
        ended = self.ended or time.perf_counter()
        first = self.first_token_at or ended
        out = []
        for row in self.rows:
            done = row.finish_reason is not None
            text = row.assembler.text if done else row.assembler.text[: row.assembler.emitted]
            out.append(GenerationResult(
                text=text, token_ids=list(row.generated), prompt_tokens=len(row.prompt),
                finish_reason=row.finish_reason or "interrupted", seconds=ended - self.started,
                first_token_seconds=first - self.started, provider=self.engine.provider,
                backend=self.engine.backend, cached_tokens=self.cached_tokens,
                recomputes=self.engine.recomputes - self.recomputes_before))
        return out


class TextStream:
    """Iterate to get a reply's text pieces; afterwards (or after `close()`), `result` holds the reply.

    Stopping early — `close()`, an exception or Ctrl-C while iterating — still leaves a `result`
    (finish_reason "interrupted", the text shown so far).
    """

    def __init__(self, generation: Generation) -> None:
        self._generation = generation
        self._pieces = generation.pieces()
        self._callbacks: list[Callable[[GenerationResult], None]] = []
        self.result: GenerationResult | None = None
        self.dropped_messages = 0  # chat: history messages dropped to fit the context

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        if self.result is not None:
            raise StopIteration
        try:
            return next(self._pieces)
        except StopIteration:
            self._finish()
            raise
        except BaseException:
            self._finish()
            raise

    def close(self) -> None:
        """Stop generating; `result` then holds what was produced so far."""
        if self.result is None:
            self._pieces.close()
            self._finish()

    def on_finish(self, callback: Callable[[GenerationResult], None]) -> None:
        """Call `callback(result)` once the reply ends (also when stopped early)."""
        self._callbacks.append(callback)
        if self.result is not None:
            callback(self.result)

    def finish(self) -> GenerationResult:
        """Run the stream to its end and return the result."""
        for _ in self:
            pass
        assert self.result is not None
        return self.result

    @property
    def text(self) -> str:
        """The whole reply (runs the stream to its end if needed)."""
        return self.finish().text

    def _finish(self) -> None:
        self.result = self._generation.results()[0]
        for callback in self._callbacks:
            callback(self.result)
