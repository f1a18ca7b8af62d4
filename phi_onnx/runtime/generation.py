"""The library's decoding loop, on either backend: start (prefill), then step (decode) until every row ends.

One `Generation` runs one prompt (or a static batch on the ort backend) on the caller's thread.
Each row is a `SequenceState` (sampler, finish rule, incremental text: `runtime/sequence.py`), the
same object the server's `Scheduler` drives; the engine (`runtime/engine.py`) runs the model.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from phi_onnx.runtime.engine import Engine
from phi_onnx.runtime.sampling import GenerationOptions
from phi_onnx.runtime.sequence import SequenceState, TextAssembler, TokenEvent, check_prompt, prepare_step
from phi_onnx.runtime.tokenizer import TextTokenizer

__all__ = ["Generation", "GenerationResult", "TextAssembler", "TextStream"]

log = logging.getLogger(__name__)


@dataclass
class GenerationResult:
    """One reply.

    Attributes:
        text: the reply (special tokens dropped; ends before a stop string).
        token_ids: generated ids (the EOS id that ended it included, as transformers returns it).
        finish_reason: "eos", "stop" (a stop string), "length" (max_new_tokens or the context) or
            "interrupted"; "tool_calls" for a chat reply that called tools (then `tool_calls` is set).
        first_token_seconds: time to the first token (prompt processing); `seconds` is the total.
        cached_tokens: prompt tokens whose KV cache was reused from the previous call.
        logprobs: with the `logprobs` option, one TokenEvent per generated token (its logprob and,
            with `top_logprobs`, the alternatives); else None.
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
    logprobs: list[TokenEvent] | None = None
    #: chat with tools: the calls the model made (`phi_onnx.runtime.tools.ToolCall`), and the text
    #: outside them (None when the reply is only calls); `text` stays the raw reply.
    tool_calls: list[Any] = field(default_factory=list)
    content: str | None = None

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
                "finish_reason": self.finish_reason,
                **({"content": self.content, "tool_calls": [c.to_openai() for c in self.tool_calls]}
                   if self.tool_calls else {}),
                **({"logprobs": [{"token_id": e.token_id, "logprob": e.logprob,
                                  "top_logprobs": [list(pair) for pair in e.top_logprobs]} for e in self.logprobs]}
                   if self.logprobs is not None else {})}

    def __str__(self) -> str:
        return self.text


class Generation:
    """One run of the loop over one prompt (any backend) or a static batch (engines with max_batch != 1)."""

    def __init__(self, engine: Engine, tokenizer: TextTokenizer, prompts: Sequence[Sequence[int]],
                 options: GenerationOptions, eos_token_ids: Sequence[int], context_length: int,
                 vocab_size: int) -> None:
        self.engine = engine
        self.options = options
        rows = []
        for i, prompt in enumerate(prompts):
            ids = [int(t) for t in prompt]
            check_prompt(ids, vocab_size, context_length, what=f"Prompt {i}" if len(prompts) > 1 else "The prompt")
            budget = min(options.max_new_tokens, context_length - len(ids))
            if budget < options.max_new_tokens:
                log.info("Only %d of max_new_tokens=%d fit the %d-token context after the %d-token prompt.",
                         budget, options.max_new_tokens, context_length, len(ids))
            rows.append(SequenceState(ids, options, budget, tokenizer=tokenizer, eos_token_ids=eos_token_ids,
                                      vocab_size=vocab_size))
        self.rows = rows
        self.started = 0.0
        self.first_token_at = 0.0
        self.ended = 0.0
        self.cached_tokens = 0
        self.recomputes_before = engine.recomputes

    def pieces(self) -> Iterator[str]:
        """Run the loop, yielding row 0's text as it becomes final."""
        engine, rows = self.engine, self.rows
        self.started = time.perf_counter()
        # Rows that end early stay in their slots (not run), so each slot needs its own longest run.
        logits, self.cached_tokens = engine.start([r.prompt for r in rows],
                                                  max(len(r.prompt) + r.budget for r in rows),
                                                  adapter=rows[0].options.adapter)
        out: Mapping[int, np.ndarray] = dict(enumerate(logits))
        while True:
            prepare_step([rows[b] for b in out])
            pieces: list[str] = []
            going: dict[int, list[int]] = {}  # each row's tokens the engine has not run yet
            for b, row_logits in out.items():
                row, before = rows[b], len(rows[b].generated)
                events = [row.step(row_logits), *row.fast_forward()]
                if b == 0:
                    pieces = [e.text for e in events if e.text]
                if not row.done:
                    going[b] = row.generated[before:]
            if not self.first_token_at:
                self.first_token_at = time.perf_counter()
            yield from pieces
            if not going:
                break
            out = engine.step(going)
        self.ended = time.perf_counter()

    def results(self) -> list[GenerationResult]:
        """One result per prompt; rows still running (an interrupted stream) end as "interrupted"."""
        ended = self.ended or time.perf_counter()
        first = self.first_token_at or ended
        return [GenerationResult(
            text=row.text(finished=row.done), token_ids=list(row.generated), prompt_tokens=len(row.prompt),
            finish_reason=row.finish_reason or "interrupted", seconds=ended - self.started,
            first_token_seconds=first - self.started, provider=self.engine.provider,
            backend=self.engine.backend, cached_tokens=self.cached_tokens,
            recomputes=self.engine.recomputes - self.recomputes_before,
            logprobs=list(row.events) if self.options.logprobs else None) for row in self.rows]


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
        self.tool_format: str | None = None  # chat with tools: how calls are written (runtime/tools.py)
        self.structured = False  # chat with tools and a response format: ToolCallStream(..., structured=)
        self.tool_names: tuple[str, ...] = ()  # chat with tools: the tools offered (ToolCallStream(..., names=))

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
