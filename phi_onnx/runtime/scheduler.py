"""Continuous batching on the ort backend: many requests, one model, the tokens each would get alone.

A `Scheduler` thread drives the model's `DecodeCore` (runtime/core.py) over a `KVPool` of its own
(`max_batch` slots of `capacity` tokens, allocated and written once). Each step:

1. drops cancelled requests and admits waiting ones into free slots (lowest first);
2. prefills: batch-1 runs bound to one slot's row, at most `chunk` prompt tokens per step in all,
   so a newcomer stalls the running streams by at most one chunk (`DecodeCore.prefill`);
3. decodes: one new token for every request whose prompt is done (`DecodeCore.decode`: as few runs
   as the LongRoPE run keys allow, each row at its own position), then each request's
   `SequenceState` samples with its own options and random generator (a seeded request gives
   the same tokens whatever else runs) and applies the finish rule; its events go to its sink.

A request whose sampling fails (its own logits processor, say) ends with "error" alone; the others
in the step go on. The scheduler shares the Model's InferenceSession (ONNX Runtime sessions allow
concurrent runs) but never its KV pool, so library calls on the same Model keep working alongside it.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from phi_onnx.errors import OptionsError, PhiOnnxError
from phi_onnx.runtime.kv_pool import CGROUPS, MEMINFO, available_memory, check_pool_memory, pool_bytes
from phi_onnx.runtime.options import MAX_TOP_LOGPROBS, GenerationOptions
from phi_onnx.runtime.sequence import Event, FinishEvent, SequenceState, TokenEvent, check_length, check_prompt

if TYPE_CHECKING:
    from phi_onnx.runtime.model import Model

__all__ = ["CGROUPS", "CHUNK", "MAX_TOP_LOGPROBS", "MEMINFO", "Event", "FinishEvent", "QueueFullError", "Request",
           "Scheduler", "SchedulerClosedError", "TokenEvent", "available_memory", "check_pool_memory", "pool_bytes"]

log = logging.getLogger(__name__)

#: Most prompt tokens prefilled per step: the longest a newcomer stalls the running streams.
CHUNK = 256


class QueueFullError(PhiOnnxError):
    """The scheduler's waiting queue is full; try again later."""


class SchedulerClosedError(PhiOnnxError):
    """The scheduler has stopped and accepts no more requests."""


@dataclass(eq=False)
class Request:
    """A submitted request; iterate it for its events (blocking), or give `submit` a `sink`."""

    id: int
    prompt: list[int]
    options: GenerationOptions
    budget: int
    sink: Callable[[Event], None]
    submitted_at: float = field(default_factory=time.perf_counter)
    admitted_at: float | None = None
    finish: FinishEvent | None = None
    cancelled: bool = False
    slot: int | None = None
    seq: SequenceState | None = field(default=None, repr=False)
    _events: queue.Queue[Event] | None = field(default=None, repr=False)
    _drained: bool = field(default=False, repr=False)

    @property
    def generated(self) -> list[int]:
        """The ids generated so far."""
        return self.seq.generated if self.seq is not None else []

    @property
    def first_token_at(self) -> float | None:
        """When the first token was chosen (perf_counter), or None."""
        return self.seq.first_token_at if self.seq is not None else None

    def cancel(self) -> None:
        """Stop this request at the next step (its slot is freed then)."""
        self.cancelled = True

    def __iter__(self) -> Iterator[Event]:
        """The request's events up to its FinishEvent; once that was read, iterating again yields nothing."""
        if self._events is None:
            raise OptionsError("This request streams to its sink; it cannot be iterated.",
                               hint="Read the events in the sink, or submit without one.")
        while not self._drained:
            event = self._events.get()
            if isinstance(event, FinishEvent):
                self._drained = True
            yield event

    def result(self) -> tuple[list[int], FinishEvent]:
        """Block until the end; (generated ids, the finish event). May be called again afterwards."""
        for _ in self:
            pass
        assert self.finish is not None
        return list(self.generated), self.finish


def _count(value: Any, name: str, low: int, high: int | None = None) -> int:
    """A whole-number argument, checked (OptionsError naming it, not a TypeError later)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low or \
            (high is not None and value > high):
        span = f"{low}..{high}" if high is not None else f">= {low}"
        raise OptionsError(f"{name} must be a whole number {span} (got {value!r}).",
                           hint="Use e.g. Scheduler(model, max_batch=8, max_queue=64).")
    return int(value)


class Scheduler:
    """Continuous batching over a loaded ort-backend Model (see the module docstring).

    Args:
        model: a Model loaded with backend="ort".
        max_batch: KV slots, i.e. requests decoded together.
        max_queue: most requests waiting for a slot; `submit` raises QueueFullError beyond it.
        capacity: tokens per slot (prompt + reply); default the export's max_length (genai_config).
        chunk: most prompt tokens prefilled per step.
    """

    def __init__(self, model: Model, *, max_batch: int = 8, max_queue: int = 64, capacity: int | None = None,
                 chunk: int = CHUNK) -> None:
        from phi_onnx.runtime.model import Model

        if not isinstance(model, Model):
            raise OptionsError(f"Scheduler() takes a loaded Model, not {type(model).__name__}.",
                               hint='Use Scheduler(phi_onnx.load(path, backend="ort")).')
        if model.backend != "ort":
            raise OptionsError(f"Continuous batching needs the ort backend; this model runs on {model.backend}.",
                               hint='Load it with phi_onnx.load(path, backend="ort").')
        max_batch, max_queue = _count(max_batch, "max_batch", 1, 256), _count(max_queue, "max_queue", 0)
        chunk = _count(chunk, "chunk", 1)
        if capacity is not None:
            capacity = _count(capacity, "capacity", 2, model.folder.context_length)
        folder = model.folder
        self.model = model
        self.core = model.core
        self.vocab = folder.vocab_size
        self.eos = tuple(folder.eos_token_ids)
        self.max_batch, self.max_queue, self.chunk = max_batch, max_queue, chunk
        self.capacity, self.pool_bytes = pool_bytes(folder, max_batch, capacity)
        if model.device.kind != "cuda":
            check_pool_memory(self.pool_bytes, max_batch, self.capacity)
        self.pool = self.core.pool(max_batch, self.capacity, prefault=True)
        log.info("KV pool: %d slots x %d tokens, %d buffers, %.1f MiB on %s", max_batch, self.capacity,
                 len(self.pool.buffers), self.pool_bytes / 2**20, self.pool.device)
        self.slots: list[Request | None] = [None] * max_batch
        self.waiting: deque[Request] = deque()
        self.recomputes = 0
        self.steps = 0
        self._ids = itertools.count()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.failure: str | None = None  # why the scheduler thread died, if it did

    # -- public ---------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the scheduler thread (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="phi-onnx-scheduler", daemon=True)
            self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        """Stop: cancel what is waiting or running (each gets a "cancelled" FinishEvent), join the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                # Still inside one long run: it cancels everyone itself when that run returns (_loop);
                # finishing requests here would race with it.
                log.warning("the scheduler's current step outlasted %.0f s; it stops when that step ends", timeout)
                return
            self._thread = None
        self._cancel_all()  # also when never started

    def _finish_all(self, reason: str, error: str | None = None) -> None:
        """Finish every waiting and running request (call with the condition held)."""
        for request in list(self.waiting) + [r for r in self.slots if r is not None]:
            self._finish(request, reason, error=error)
        self.waiting.clear()

    def _cancel_all(self) -> None:
        with self._cond:
            self._finish_all("cancelled")

    @property
    def active(self) -> int:
        """Requests holding a slot."""
        return sum(r is not None for r in self.slots)

    @property
    def queued(self) -> int:
        """Requests waiting for a slot."""
        return len(self.waiting)

    @property
    def held_tokens(self) -> int:
        """Tokens whose keys and values the pool holds, over every slot."""
        return sum(self.pool.filled(s) for s in range(self.max_batch))

    def check(self, prompt_tokens: int, max_new_tokens: int | None = None) -> None:
        """Raise PromptTooLongError unless `prompt_tokens` (+ `max_new_tokens`) fit one slot."""
        check_length(prompt_tokens, self.capacity, max_new_tokens, where="this server's context")

    def submit(self, prompt: Sequence[int], options: GenerationOptions | None = None, *,
               logprobs: int | None = None, presence_penalty: float | None = None,
               frequency_penalty: float | None = None, sink: Callable[[Event], None] | None = None) -> Request:
        """Queue a request (token ids); returns its handle. Events go to `sink` (called on the
        scheduler thread, so it must be quick and thread-safe) or, without one, to the handle's iterator.

        `logprobs` (top alternatives, or 0 for the chosen token's only), `presence_penalty` and
        `frequency_penalty` are GenerationOptions fields now; the keywords remain for older callers.
        `options.adapter` picks the request's switchable LoRA adapter (None: the base); requests with
        different adapters decode in the same runs.

        Raises OptionsError / PromptTooLongError for a bad request, QueueFullError when the queue is full.
        """
        options = self.model.defaults if options is None else options
        if not isinstance(options, GenerationOptions):
            raise OptionsError(f"options must be GenerationOptions, not {type(options).__name__}.",
                               hint="Use model.options(max_new_tokens=..., ...).")
        extra: dict[str, Any] = {}
        if logprobs is not None:
            extra.update(logprobs=True, top_logprobs=logprobs)
        if presence_penalty is not None:
            extra["presence_penalty"] = presence_penalty
        if frequency_penalty is not None:
            extra["frequency_penalty"] = frequency_penalty
        if extra:
            options = dataclasses.replace(options, **extra)  # validated by GenerationOptions
        if isinstance(prompt, (str, bytes)) or not isinstance(prompt, (Sequence, np.ndarray)):
            raise OptionsError(f"submit() takes a list of token ids, not {type(prompt).__name__}.",
                               hint="Encode text first: model.encode(text).")
        items = prompt.tolist() if isinstance(prompt, np.ndarray) else list(prompt)
        if not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in items):
            bad = next(t for t in items if not isinstance(t, (int, np.integer)) or isinstance(t, bool))
            raise OptionsError(f"Token ids must be integers (got {bad!r}).",
                               hint="Pass ids from model.encode(), not floats or strings.")
        ids = [int(t) for t in items]
        check_prompt(ids, self.vocab, self.capacity, where="this server's context")
        self.core.check_adapter(options.adapter)
        if sink is not None and not callable(sink):
            raise OptionsError(f"sink must be callable (got {type(sink).__name__}).",
                               hint="Pass a function taking one event, or no sink to iterate the request.")
        events: queue.Queue[Event] | None = None
        if sink is None:
            events = queue.Queue()
            sink = events.put
        request = Request(next(self._ids), ids, options, min(options.max_new_tokens, self.capacity - len(ids)),
                          sink, _events=events)
        with self._cond:
            if self.failure is not None:
                raise SchedulerClosedError(f"The scheduler has failed ({self.failure}).",
                                           hint="Restart the server; the log shows the traceback.")
            if self._stopping:
                raise SchedulerClosedError("The server is shutting down.", hint="Retry on another replica.")
            # Requests that a free slot takes at the next step do not count as queued.
            if len(self.waiting) >= self.max_queue + self.max_batch - self.active:
                raise QueueFullError(f"{len(self.waiting)} requests are already waiting (max_queue "
                                     f"{self.max_queue}).", hint="Retry in a few seconds.")
            self.waiting.append(request)
            self._cond.notify_all()
        return request

    @property
    def alive(self) -> bool:
        """False once the scheduler thread has died (see `failure`); a server reports it unhealthy."""
        return self.failure is None

    # -- the loop -------------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            self._serve()
            self._cancel_all()
        except BaseException as error:  # the loop itself broke: nobody would ever answer the waiting requests
            log.exception("the scheduler thread died")
            with self._cond:
                self.failure = f"{type(error).__name__}: {error}"
                self._stopping = True
                self._finish_all("error", error=self.failure)

    def _serve(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self.waiting and self.active == 0:
                    self._cond.wait()
                if self._stopping:
                    return
            try:
                with self._cond:
                    self._admit()
                self._step()
            except Exception as error:  # a bug or an ORT failure: fail the running requests, keep serving
                log.exception("scheduler step failed")
                with self._cond:
                    for request in [r for r in self.slots if r is not None]:
                        self._finish(request, "error", error=str(error))

    def _admit(self) -> None:
        """Drop cancelled requests, then fill free slots from the queue (call with the condition held)."""
        for request in [r for r in self.slots if r is not None and r.cancelled]:
            self._finish(request, "cancelled")
        if any(r.cancelled for r in self.waiting):  # a client gone while queued frees its place now
            # One read of `cancelled` per request: a client thread may set it between two reads, and a
            # request dropped from the queue unfinished would never get its FinishEvent.
            kept: deque[Request] = deque()
            for request in self.waiting:
                if request.cancelled:
                    self._finish(request, "cancelled")
                else:
                    kept.append(request)
            self.waiting = kept
        for slot in range(self.max_batch):
            while self.slots[slot] is None and self.waiting:
                request = self.waiting.popleft()
                if request.cancelled:
                    self._finish(request, "cancelled")
                    continue
                try:
                    request.seq = SequenceState(request.prompt, request.options, request.budget,
                                                tokenizer=self.model.tokenizer, eos_token_ids=self.eos,
                                                vocab_size=self.vocab)
                except PhiOnnxError as error:  # e.g. a logit_bias id outside the vocabulary
                    self._finish(request, "error", error=error.message)
                    continue
                request.slot, request.admitted_at = slot, time.perf_counter()
                self.slots[slot] = request
                self.pool.clear(slot)
                self.pool.adapter[slot] = request.options.adapter  # rows of one run may differ

    def step(self) -> None:
        """One scheduling step on the caller's thread (for tests and tools, when `start()` was not called)."""
        if self._thread is not None:
            raise OptionsError("step() cannot run while the scheduler thread runs (start() was called).",
                               hint="Use either start() or step(), not both.")
        with self._cond:
            self._admit()
        self._step()

    def _step(self) -> None:
        self.steps += 1
        budget = self.chunk
        for request in [r for r in self.slots if r is not None]:
            if budget <= 0:
                break
            if request.seq is not None and self.pool.filled(request.slot or 0) < len(request.prompt):
                budget -= self._prefill(request, budget)
        self._decode()

    def _prefill(self, request: Request, budget: int) -> int:
        """Run the next prompt chunk of `request`; sample its first token when the prompt is done. Returns
        tokens run."""
        slot = request.slot
        assert slot is not None
        before = self.pool.filled(slot)
        logits = self.core.prefill(self.pool, slot, request.prompt, limit=budget)
        if logits is not None:
            self._sample(request, logits)
        return self.pool.filled(slot) - before

    def _decode(self) -> None:
        """One new token for every request whose prompt is done and that has not finished."""
        tokens = {}
        for slot, request in enumerate(self.slots):
            seq = request.seq if request is not None else None
            if seq is not None and seq.generated and not seq.done and \
                    self.pool.filled(slot) == len(seq.prompt) + len(seq.generated) - 1:
                tokens[slot] = seq.generated[-1]
        if not tokens:
            return
        before = self.core.recomputes
        out = self.core.decode(self.pool, tokens)
        self.recomputes += self.core.recomputes - before
        for slot, logits in out.items():
            request = self.slots[slot]
            assert request is not None
            self._sample(request, logits)

    # -- sampling, events -----------------------------------------------------------------------
    def _sample(self, request: Request, logits: np.ndarray) -> None:
        seq = request.seq
        assert seq is not None
        if request.finish is not None:  # finished while this step ran (closed, or its sink failed)
            return
        try:
            event = seq.step(logits)
        except Exception as error:  # this request's sampling (its logits processor, its numbers): it alone ends
            log.warning("request %d: sampling failed: %s", request.id, error)
            with self._cond:
                self._finish(request, "error", error=getattr(error, "message", None) or str(error))
            return
        self._emit(request, event)
        if seq.done:
            with self._cond:
                self._finish(request, seq.finish_reason or "stop")

    def _finish(self, request: Request, reason: str, error: str | None = None) -> None:
        """Free the request's slot and send its FinishEvent (call with the condition held)."""
        if request.finish is not None:
            return
        if request.slot is not None and self.slots[request.slot] is request:
            self.slots[request.slot] = None
            self.pool.clear(request.slot)
        request.slot = None
        seq = request.seq
        text = seq.text(finished=reason not in ("cancelled", "error")) if seq is not None else ""
        request.finish = FinishEvent(reason, len(request.prompt), len(request.generated), text, error)
        self._emit(request, request.finish)
        self._cond.notify_all()

    @staticmethod
    def _emit(request: Request, event: Event) -> None:
        """Send `event` to the request's sink; a sink that raises cancels its own request, not everyone's."""
        try:
            request.sink(event)
        except Exception:
            log.exception("the sink of request %d raised; cancelling it", request.id)
            request.cancelled = True
