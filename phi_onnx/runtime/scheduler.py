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

A request whose grammar forces the tokens after its sampled one takes them at once (fast-forward,
`SequenceState.fast_forward`); before the prompt chunks, a step runs such a request's pending tokens in
one batch-1 run (`DecodeCore.extend`, the same run the library makes), counted against the prefill budget.

Prefix reuse (on unless `prefix_cache=False`): a finished request's slot keeps its tokens and KV
rows. A newcomer goes to the free slot holding the longest common prefix of its prompt (else an
empty slot, else the least recently used one, whose contents are first saved to the `PrefixStore`),
and runs only the rest. Before each prefill chunk the scheduler also looks for a longer prefix in
any other slot (busy or free) and in the store, and copies those rows (same positions: nothing is
recomputed or shifted). Requests that share a long prefix with one that is still computing it wait
for it rather than compute it twice. Matching is on token ids, under the LongRoPE rule.

Stalls are bounded by time: while streams decode, a step's prefill work is sized so that the whole step
(admission, prompt runs, the decode of the rows running now) takes about 1 + `stall_factor` decode steps
at the pool's occupancy (measured per row count: the step the streams see once every request holding a
slot decodes), so running streams' inter-token latency stays within about that many times its usual
value; with nothing decoding a step prefills `chunk` tokens, and once a stream starts within a step the
rest of that step keeps to the bound. A prompt is cut
into even pieces (`piece`): every run reads all the weights once, so a small remnant run costs almost a
decode step of its own.

Cold prompts that arrive together while nothing streams (all at once: a batch job, users starting at the same
moment) form a cohort instead (`_cohort_members`): their prompts are prefilled back to back, each first token
sent as it comes, and their streams start decoding together once the last prompt is in, as a static batch
would. Interleaving the first streams' decode steps with the others' small pieces made every prompt cost a
pass over the weights and a decode step per piece, 7-17 % of such a load's output tokens/s on a CPU where a
decode step is cheap beside a prompt token. A prompt that shares most of itself with a member or a cache (a
returning conversation, a common system prompt) is cheap to interleave and starts under the bound; a cohort
computes at most `cohort_tokens` prompt tokens (its first member alone may exceed them). Its price: a stream
that got its first token early waits once for the others' prompts before its second.

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
from phi_onnx.runtime.defaults import COHORT_TOKENS, MAX_BATCH, MAX_QUEUE, STALL_FACTOR
from phi_onnx.runtime.kv_pool import CGROUPS, MEMINFO, available_memory, check_pool_memory, pool_bytes
from phi_onnx.runtime.options import MAX_TOP_LOGPROBS, GenerationOptions, finite_number
from phi_onnx.runtime.prefix_cache import MIN_TOKENS, PrefixStore
from phi_onnx.runtime.sequence import (
    Event,
    FinishEvent,
    SequenceState,
    TokenEvent,
    check_length,
    check_prompt,
    prepare_step,
)

if TYPE_CHECKING:
    from phi_onnx.runtime.model import Model

__all__ = ["CGROUPS", "CHUNK", "COHORT_TOKENS", "MAX_BATCH", "MAX_QUEUE", "MAX_TOP_LOGPROBS", "MEMINFO",
           "STALL_FACTOR", "Event", "FinishEvent", "QueueFullError", "Request",
           "Scheduler", "SchedulerClosedError", "TokenEvent", "available_memory", "check_pool_memory", "pool_bytes"]

log = logging.getLogger(__name__)

#: Most prompt tokens prefilled per step.
CHUNK = 256
#: How far over the budget a piece may run rather than leave a remnant for another run.
SLACK = 1.25
#: Fewest prompt tokens a step prefills while streams decode (every run reads all the weights: tiny pieces waste
#: it), where such a piece keeps the step within the stall bound (see _prefill_budget).
MIN_PREFILL = 12
#: Share of the memory available at start that the prefix store may use by default.
PREFIX_CACHE_SHARE = 0.2


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
    cached_tokens: int = 0  # prompt tokens served from a cache (own slot, another slot, the store)
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


def _average(old: float | None, new: float, weight: float = 0.3) -> float:
    """An exponential moving average (the first value as is)."""
    return new if old is None else (1 - weight) * old + weight * new


def piece(remaining: int, budget: int, slack: float = SLACK) -> int:
    """How many of a prompt's `remaining` tokens to run now, under a step's `budget`: all of them when
    they fit within `slack` times the budget, else an even share of the fewest runs that do (a run over
    a few leftover tokens would cost almost as much as a decode step: it reads all the weights)."""
    if remaining <= 0 or budget <= 0:
        return 0
    allowed = max(1, int(budget * slack))
    if remaining <= allowed:
        return remaining
    runs = -(-remaining // allowed)
    return -(-remaining // runs)


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
        prefix_cache: reuse prompt prefixes across requests (slots and the prefix store).
        prefix_cache_bytes: the prefix store's budget (default a fifth of the memory available at start;
            0: slots only).
        stall_factor: while streams decode, a step's prefill takes about this many decode steps' time.
        cohort_tokens: cold prompts arriving together while nothing streams are prefilled back to back and
            start decoding together, up to this many prompt tokens to compute (0: never; see `_cohort_members`).
    """

    def __init__(self, model: Model, *, max_batch: int = MAX_BATCH, max_queue: int = MAX_QUEUE,
                 capacity: int | None = None, chunk: int = CHUNK, prefix_cache: bool = True,
                 prefix_cache_bytes: int | None = None, stall_factor: float = STALL_FACTOR,
                 cohort_tokens: int = COHORT_TOKENS) -> None:
        from phi_onnx.runtime.model import Model

        if not isinstance(model, Model):
            raise OptionsError(f"Scheduler() takes a loaded Model, not {type(model).__name__}.",
                               hint='Use Scheduler(phi_onnx.load(path, backend="ort")).')
        if model.backend != "ort":
            raise OptionsError(f"Continuous batching needs the ort backend; this model runs on {model.backend}.",
                               hint='Load it with phi_onnx.load(path, backend="ort").')
        max_batch, max_queue = _count(max_batch, "max_batch", 1, 256), _count(max_queue, "max_queue", 0)
        chunk = _count(chunk, "chunk", 1)
        self.cohort_tokens = _count(cohort_tokens, "cohort_tokens", 0)
        if capacity is not None:
            capacity = _count(capacity, "capacity", 2, model.folder.context_length)
        if prefix_cache_bytes is not None:
            prefix_cache_bytes = _count(prefix_cache_bytes, "prefix_cache_bytes", 0)
        if not finite_number(stall_factor) or stall_factor <= 0:
            raise OptionsError(f"stall_factor must be a positive number (got {stall_factor!r}).",
                               hint="Use e.g. stall_factor=2.0.")
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
        self.last_used = [0.0] * max_batch  # when each slot's request ended (LRU among free slots)
        self.waiting: deque[Request] = deque()
        self.prefix_cache = bool(prefix_cache)
        self.store: PrefixStore | None = None
        if self.prefix_cache and self.pool.device == "cpu":
            if prefix_cache_bytes is None:
                prefix_cache_bytes = int((available_memory() or 0) * PREFIX_CACHE_SHARE)
            self.store = PrefixStore(prefix_cache_bytes, self.core.rope)
            log.info("prefix cache: the slots, and a store of up to %.1f MiB", prefix_cache_bytes / 2**20)
        self.stall_factor = float(stall_factor)
        self.reused_tokens = 0  # prompt tokens a request found in its own slot
        self.copied_tokens = 0  # prompt tokens copied from another slot or the store
        self.computed_tokens = 0  # prompt tokens prefilled
        self._decode_seconds: dict[int, float] = {}  # rows -> moving average of a decode step (prefill budget)
        self._token_seconds: float | None = None  # a prompt token's share of a prefill run, moving average
        self._admit_seconds = 0.0  # the current step's admission (slot placement, prefix store saves)
        self._cohort: set[int] | None = None  # ids of the requests starting together (see _cohort_members)
        self._cohort_tokens = 0  # prompt tokens the cohort computes (within cohort_tokens, but for a first alone)
        self._cohort_full = False  # a request did not join: none after it may
        self._cohort_first = float("inf")  # when the cohort's first token came: later arrivals do not join
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
        """Tokens whose keys and values the pool holds for running requests."""
        return sum(self.pool.filled(s) for s in range(self.max_batch) if self.slots[s] is not None)

    @property
    def idle_tokens(self) -> int:
        """Tokens kept in free slots for prefix reuse."""
        return sum(self.pool.filled(s) for s in range(self.max_batch) if self.slots[s] is None)

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
                self._timed_admit()
                self._step()
            except Exception as error:  # a bug or an ORT failure: fail the running requests, keep serving
                log.exception("scheduler step failed")
                self._cohort = None  # its members end here; a later cohort starts afresh
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
        copied = 0  # bytes this admission saved to the prefix store
        while self.waiting and None in self.slots:
            request = self.waiting[0]
            if request.cancelled:
                self._finish(self.waiting.popleft(), "cancelled")
                continue
            slot, shared = self._choose(request)
            saves = shared < self.pool.filled(slot) and self.store is not None
            if saves and copied:
                break  # each save stalls the running streams (several slots freed at once took 250 ms): next step
            self.waiting.popleft()
            try:
                request.seq = SequenceState(request.prompt, request.options, request.budget,
                                            tokenizer=self.model.tokenizer, eos_token_ids=self.eos,
                                            vocab_size=self.vocab)
            except PhiOnnxError as error:  # e.g. a logit_bias id outside the vocabulary
                self._finish(request, "error", error=error.message)
                continue
            copied += self._place(request, slot, shared, saves)
            request.slot, request.admitted_at = slot, time.perf_counter()
            self.slots[slot] = request

    def _choose(self, request: Request) -> tuple[int, int]:
        """The free slot for `request` and the prompt tokens it holds: the one holding the longest prefix of
        its prompt, else an empty one, else the least recently used."""
        free = [s for s in range(self.max_batch) if self.slots[s] is None]
        reuses = self._reuses(request)
        shared = {s: self._shared(s, request) if reuses else 0 for s in free}
        slot = max(free, key=lambda s: (shared[s], not self.pool.filled(s), -self.last_used[s]))
        return slot, shared[slot]

    def _place(self, request: Request, slot: int, shared: int, save: bool) -> int:
        """Give `slot` to `request`, keeping only the `shared` prefix; with `save`, what it held beyond is
        saved to the store first. Returns the bytes saved."""
        adapter, pool = request.options.adapter, self.pool
        copied = 0
        if save and self.store is not None:
            copied = self.store.save(pool, slot)  # what this slot held would be lost: keep it for later
        pool.keep(slot, shared)
        pool.adapter[slot] = adapter  # the rows it keeps were computed with this adapter
        request.cached_tokens = shared
        self.reused_tokens += shared
        return copied

    def step(self) -> None:
        """One scheduling step on the caller's thread (for tests and tools, when `start()` was not called)."""
        if self._thread is not None:
            raise OptionsError("step() cannot run while the scheduler thread runs (start() was called).",
                               hint="Use either start() or step(), not both.")
        self._timed_admit()
        self._step()

    def _timed_admit(self) -> None:
        """`_admit` under the condition, timed: its prefix-store saves are part of the step's stall."""
        admitting = time.perf_counter()
        with self._cond:
            self._admit()
        self._admit_seconds = time.perf_counter() - admitting

    def _step(self) -> None:
        self.steps += 1
        started, computed = time.perf_counter(), self.computed_tokens
        unfilled = sorted((r for r in self.slots if r is not None and r.seq is not None
                           and self.pool.filled(r.slot or 0) < len(r.prompt)), key=lambda r: r.id)
        cohort = self._cohort_members(unfilled)
        decoding = cohort is None and self._decoding()
        budget = self._fast_forward(self._prefill_budget() if decoding else self.chunk, held=cohort)
        prefilling = unfilled if cohort is None else [r for r in unfilled if r.id in cohort]
        waiting_for: list[Request] = []
        ran = 0
        for request in prefilling:
            if budget <= 0:
                break
            if self._reuses(request):
                self._import_prefix(request)
                if self._shares_work(request, waiting_for):
                    continue  # an earlier request is computing this one's prefix right now
            waiting_for.append(request)
            if ran and decoding:
                budget -= self._run_tokens()  # a second run reads the weights again: the streams wait for that too
                if budget <= 0:
                    break
            remaining = len(request.prompt) - self.pool.filled(request.slot or 0)
            size = piece(remaining, budget) if decoding else min(remaining, budget)
            if ran and size < min(remaining, MIN_PREFILL):
                break  # the budget's rest is too small for a run of its own: next step
            budget -= self._prefill(request, size)
            ran += 1
            if cohort is not None and request.first_token_at is not None:  # members take first tokens only here
                self._cohort_first = min(self._cohort_first, request.first_token_at)  # kept: it may finish at it
            if cohort is None and not decoding and request.generated:
                decoding = True  # a stream started: the rest of this step keeps the bound
                budget = min(budget, self._prefill_budget())
        prefilled = time.perf_counter()
        rows = 0 if self._cohort_waits() else self._decode()
        if log.isEnabledFor(logging.DEBUG):  # the step's shape and times, to see where stalls come from
            log.debug("step %d at %.3f s: prefill %d tokens %.0f ms, decode %d rows %.0f ms%s", self.steps, started,
                      self.computed_tokens - computed, 1000 * (prefilled - started), rows,
                      1000 * (time.perf_counter() - prefilled),
                      f" (cohort of {len(self._cohort)})" if self._cohort is not None else "")

    def _cohort_members(self, unfilled: list[Request]) -> set[int] | None:
        """The ids of the cohort this step prefills, or None: requests that arrived together while nothing
        streamed (all at once) prefill back to back, each first token sent as it comes, and their streams start
        decoding together once the last prompt is in (`_cohort_waits`). Interleaving the first streams'
        decode steps with the others' pieces (the stall bound) cost such a batch 7-17 % of its output
        tokens/s and a third more TTFT; what it bought, the early streams' second tokens seconds sooner, is
        what the cohort gives up (see the module docstring). A cohort opens when a prompt is being prefilled
        and no stream runs; it takes requests in arrival order while they arrived before its first token,
        compute at least half their own prompt (`_joins`) and its prompt tokens to compute stay within
        `cohort_tokens`; the first that does not ends the joining. `unfilled`: the admitted requests whose
        prompts are not in yet, oldest first."""
        if self._cohort is None:
            if not unfilled or self._running() or not self.cohort_tokens:
                return None
            self._cohort, self._cohort_tokens, self._cohort_full, self._cohort_first = set(), 0, False, float("inf")
        members = self._cohort
        for request in unfilled:
            if request.id in members:
                continue
            if self._cohort_full or not self._joins(request):
                self._cohort_full = True
                break
            self._cohort_tokens += self._cohort_need(request)
            members.add(request.id)
        return members

    def _cohort_need(self, request: Request) -> int:
        """Prompt tokens `request` would compute: its prompt less the longest prefix a cache serves it (a slot,
        its own or another, or the store) or a member computes (a copy, not a run)."""
        assert self._cohort is not None
        rope = self.core.rope
        cached = self.pool.filled(request.slot) if request.slot is not None else 0
        if self._reuses(request):
            cached = max(cached, self._longest_prefix(request)[2])
            for other in self.slots:
                if other is not None and other is not request and other.id in self._cohort and \
                        other.options.adapter == request.options.adapter:
                    cached = max(cached, rope.reusable(other.prompt, rope.is_long(len(other.prompt)), request.prompt))
        return max(len(request.prompt) - cached, 1)

    def _joins(self, request: Request) -> bool:
        """Whether `request` joins the cohort (see _cohort_members); the first always does. A request that
        would compute less than half its prompt (a returning conversation, a prompt sharing a member's prefix)
        starts in a few pieces under the stall bound instead: cheap to interleave, and starting it with the
        others would hold every stream for it and keep a multi-turn load's users in lockstep."""
        assert self._cohort is not None
        if not self._cohort:
            return True
        need = self._cohort_need(request)
        return request.submitted_at <= self._cohort_first and 2 * need >= len(request.prompt) and \
            self._cohort_tokens + need <= self.cohort_tokens

    def _cohort_waits(self) -> bool:
        """Whether the cohort's streams hold their decoding this step: a member's prompt is not in yet, or the
        next queued request arrived before the cohort's first token and a free slot will take it. Otherwise
        the cohort ends (its streams decode from this step on, under the stall bound like any others)."""
        if self._cohort is None:
            return False
        for request in self.slots:
            if request is not None and request.id in self._cohort and request.seq is not None and \
                    not request.seq.done and self.pool.filled(request.slot or 0) < len(request.prompt):
                return True
        if not self._cohort_full and None in self.slots:
            with self._cond:
                head = next((r for r in self.waiting if not r.cancelled), None)
            if head is not None and self._joins(head):
                return True
        self._cohort = None
        return False

    def _decoding(self) -> bool:
        """Whether a stream is running (has its first token and is not done)."""
        return self._running() > 0

    def _running(self) -> int:
        """Streams running (first token out, not done): the rows this step decodes, besides any that start."""
        return sum(1 for r in self.slots if r is not None and r.seq is not None and r.seq.generated and not r.seq.done)

    def _prefill_budget(self) -> int:
        """Prompt tokens a step may prefill while streams decode, at the measured prefill speed (`chunk` until
        the speeds were measured): the streams wait for the whole step (the admission, the run's pass over
        the weights, its tokens, the decode step at the rows running now), which may take 1 + stall_factor
        decode steps at the pool's occupancy. The budget is raised towards MIN_PREFILL only as far as a
        piece (up to SLACK times the budget) keeps the step within 1 + SLACK x stall_factor of them; it is
        none when the admission already took half of the room."""
        seconds, run = self._decode_step_seconds(max(self.active, 1)), self._decode_step_seconds(1)
        # the rows running now, and one more: a prompt that completes in this step decodes in it too
        now = self._decode_step_seconds(min(self._running() + 1, max(self.active, 1)))
        if seconds is None or run is None or now is None or self._token_seconds is None:
            return self.chunk
        token = max(self._token_seconds, 1e-9)
        # Fewer rows running than the pool holds (streams starting together) leave the pieces more room.
        room = (1 + self.stall_factor) * seconds - now - run
        if self._admit_seconds > room / 2:
            return 0  # the admission (saving a slot's prefix to the store) took most of it: the prompts wait
        fits = (room - self._admit_seconds) / token
        # Small pieces waste a run each, but where a decode step is cheap beside a prompt token (a CPU with
        # fast int8 dot products: 4 rows in 54 ms, a 12-token piece 110 ms) MIN_PREFILL alone stalled the
        # streams for 3x their step.
        worst = (1 + SLACK * self.stall_factor) * seconds - now - run - self._admit_seconds
        floor = max(min(MIN_PREFILL, worst / (SLACK * token)), 1)
        return int(min(max(fits, floor), self.chunk))

    def _run_tokens(self) -> int:
        """A run's own cost (one pass over the weights: a one-row decode step) in prompt tokens (0 unmeasured)."""
        run = self._decode_step_seconds(1)
        if run is None or self._token_seconds is None:
            return 0
        return int(run / max(self._token_seconds, 1e-9))

    def _decode_step_seconds(self, rows: int) -> float | None:
        """A decode step's time at `rows` rows: measured, else drawn through the nearest row counts measured
        (a step is one pass over the weights plus a share per row), else from one measured count plus a
        prompt token's share per extra row (a decode row is one token's work)."""
        known = self._decode_seconds
        if rows in known or not known:
            return known.get(rows)
        below, above = [n for n in known if n < rows], [n for n in known if n > rows]
        if below and above:
            lo, hi = max(below), min(above)
        elif len(known) >= 2:
            lo, hi = sorted(known, key=lambda n: abs(n - rows))[:2]
            lo, hi = min(lo, hi), max(lo, hi)
        else:
            (only,) = known
            per_row = self._token_seconds if rows > only and self._token_seconds is not None else 0.0
            return known[only] + (rows - only) * per_row
        slope = max((known[hi] - known[lo]) / (hi - lo), 0.0)
        if rows > hi and self._token_seconds is not None:
            # Beyond every count measured, two neighbouring counts taken at other contexts can slope steeply
            # (6 and 7 rows: 91 and 116 ms); an overestimate sizes pieces past the bound, so at most a prompt
            # token's share per row.
            return known[hi] + (rows - hi) * min(slope, self._token_seconds)
        return max(known[lo] + (rows - lo) * slope, 0.0)

    def _fast_forward(self, budget: int, held: set[int] | None = None) -> int:
        """Run the forced tails: each request with several tokens not in its slot yet (a sampled token and
        those its grammar forced) runs them in one batch-1 run, as the library does, then samples. Like a
        prompt chunk they use the prefill budget, oldest request first; a tail that does not fit waits a
        step, except that every step runs at least one; those of a cohort's members (`held`) wait, like their
        decoding, until the cohort starts. Returns the budget left."""
        ran = 0
        for request in sorted((r for r in self.slots if r is not None and r.seq is not None), key=lambda r: r.id):
            seq, slot = request.seq, request.slot
            assert seq is not None and slot is not None
            have = self.pool.filled(slot)
            if seq.done or not seq.generated or have < len(seq.prompt) or (held is not None and request.id in held):
                continue
            tail = seq.tokens[have:]
            if len(tail) < 2 or (ran and len(tail) > budget):
                continue
            before = self.core.recomputes
            logits = self.core.extend(self.pool, slot, tail)
            self.recomputes += self.core.recomputes - before
            ran += 1
            budget -= len(tail)
            self._sample(request, logits)
        return budget

    def _longest_prefix(self, request: Request) -> tuple[int | None, Any, int]:
        """The longest prefix of `request`'s prompt that another slot or the store holds: (that slot, the
        stored handle, its length); the store's only where it holds more than any slot."""
        source, length = None, 0
        for other in range(self.max_batch):
            if other != request.slot:
                n = self._shared(other, request)
                if n > length:
                    source, length = other, n
        if self.store is not None:
            stored, stored_length = self.store.match(request.prompt, request.options.adapter)
            if stored is not None and stored_length > length:
                return None, stored, stored_length
        return source, None, length

    def _import_prefix(self, request: Request) -> None:
        """Copy into `request`'s slot a longer prefix of its prompt held by another slot or the store."""
        slot = request.slot
        assert slot is not None
        pool = self.pool
        have = pool.filled(slot)
        source, stored, length = self._longest_prefix(request)
        if length <= have:
            return
        if stored is not None:
            assert self.store is not None
            self.store.restore(stored, length, pool, slot)
        else:
            assert source is not None
            pool.copy_rows(source, slot, length)
        self.copied_tokens += length - have
        request.cached_tokens += length - have

    def _reuses(self, request: Request) -> bool:
        """Whether `request` may start from cached rows. A seeded sampled request computes its whole prompt:
        rows computed in another chunking differ in the last bits (the kernels sum in another order), enough
        to change a sampled token, and a seed promises the same tokens every time. Greedy requests reuse."""
        return self.prefix_cache and not (request.options.do_sample and request.options.seed is not None)

    def _shared(self, slot: int, request: Request) -> int:
        """Prompt tokens of `request` that `slot`'s rows can serve: a common prefix computed with the same
        LongRoPE factors and the same adapter (another adapter's keys and values differ)."""
        pool = self.pool
        if pool.adapter[slot] != request.options.adapter:
            return 0
        return self.core.rope.reusable(pool.held[slot], pool.long[slot], request.prompt)

    def _shares_work(self, request: Request, earlier: list[Request]) -> bool:
        """Whether an earlier request in this step's prefill is computing a long prefix `request` shares."""
        rope, have = self.core.rope, self.pool.filled(request.slot or 0)
        for other in earlier:
            if other.options.adapter != request.options.adapter:
                continue
            shared = rope.reusable(other.prompt, rope.is_long(len(other.prompt)), request.prompt)
            if shared >= MIN_TOKENS and shared > have and self.pool.filled(other.slot or 0) < shared:
                return True
        return False

    def _prefill(self, request: Request, budget: int) -> int:
        """Run the next prompt chunk of `request`; sample its first token when the prompt is done. Returns
        tokens run."""
        slot = request.slot
        assert slot is not None
        before, started = self.pool.filled(slot), time.perf_counter()
        logits = self.core.prefill(self.pool, slot, request.prompt, limit=budget)
        ran = self.pool.filled(slot) - before
        self.computed_tokens += ran
        run = self._decode_step_seconds(1)
        if ran >= MIN_PREFILL and run is not None:
            share = max(time.perf_counter() - started - run, 0.0) / ran
            self._token_seconds = _average(self._token_seconds, share)
        if logits is not None:
            self._sample(request, logits)
        return ran

    def _decode(self) -> int:
        """One new token for every request whose prompt is done and that has not finished; returns how many."""
        tokens = {}
        for slot, request in enumerate(self.slots):
            seq = request.seq if request is not None else None
            if seq is not None and seq.generated and not seq.done and \
                    self.pool.filled(slot) == len(seq.prompt) + len(seq.generated) - 1:
                tokens[slot] = seq.generated[-1]
        if not tokens:
            return 0
        before, started = self.core.recomputes, time.perf_counter()
        out = self.core.decode(self.pool, tokens)
        if self.core.recomputes == before:
            self._decode_seconds[len(tokens)] = _average(self._decode_seconds.get(len(tokens)),
                                                         time.perf_counter() - started)
        self.recomputes += self.core.recomputes - before
        prepare_step([seq for slot in out if (seq := self.slots[slot].seq) is not None])  # type: ignore[union-attr]
        for slot, logits in out.items():
            request = self.slots[slot]
            assert request is not None
            self._sample(request, logits)
        return len(out)

    # -- sampling, events -----------------------------------------------------------------------
    def _sample(self, request: Request, logits: np.ndarray) -> None:
        seq = request.seq
        assert seq is not None
        if request.finish is not None:  # finished while this step ran (closed, or its sink failed)
            return
        try:
            events = [seq.step(logits), *seq.fast_forward()]
        except Exception as error:  # this request's sampling (its logits processor, its numbers): it alone ends
            log.warning("request %d: sampling failed: %s", request.id, error)
            with self._cond:
                self._finish(request, "error", error=getattr(error, "message", None) or str(error))
            return
        for event in events:
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
            self.last_used[request.slot] = time.perf_counter()
            if not self.prefix_cache or reason == "error":  # an error may have left the rows half written
                self.pool.clear(request.slot)
        request.slot = None
        seq = request.seq
        text = seq.text(finished=reason not in ("cancelled", "error")) if seq is not None else ""
        request.finish = FinishEvent(reason, len(request.prompt), len(request.generated), text, error,
                                     min(request.cached_tokens, len(request.prompt)))
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
