"""Continuous batching on the ort backend: many requests, one model, the tokens each would get alone.

A `Scheduler` thread owns a fixed KV pool: per layer and key/value one buffer
[max_batch, kv_heads, capacity, head_dim], allocated once. Row b of it is one request's cache
("slot"); a row is contiguous, so a run over rows [lo, hi) binds that part of the buffer by
pointer offset, with no copy. Each step:

1. drops cancelled requests and admits waiting ones into free slots (lowest first);
2. prefills: batch-1 runs bound to one slot's row, at most `chunk` prompt tokens per step in all,
   so a newcomer stalls the running streams by at most one chunk;
3. decodes: ONE batched run over the active slots, each row at its own position
   (GroupQueryAttention reads a per-row `seqlens_k` from the attention mask), then samples each
   request with its own options and random generator, and streams its tokens.

LongRoPE: the graph picks short or long rotary factors from the run's mask width, so a run never
mixes rows of both regimes: rows whose cache holds long-factor entries decode in a run of their
own (a second run in that step). A request whose sequence passes `original_max_position_embeddings`
recomputes its whole cache once, batch 1, as `Model.generate` does alone (and transformers does);
that run is as long as the sequence (the prefill of about `original_max_position_embeddings`
tokens) and stalls the other streams for its length. For the same reason the first prefill chunk
of a prompt longer than the original context covers the whole original context.

The scheduler reuses the Model's InferenceSession (ONNX Runtime sessions allow concurrent runs) but
never its KV buffers, so library calls on the same Model keep working alongside it.
"""

from __future__ import annotations

import contextlib
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
from phi_onnx.runtime.errors import PromptTooLongError
from phi_onnx.runtime.generation import TextAssembler
from phi_onnx.runtime.logits_to_keep import INPUT as LOGITS_TO_KEEP
from phi_onnx.runtime.sampling import GenerationOptions, Sampler

if TYPE_CHECKING:
    from phi_onnx.runtime.folder import ModelFolder
    from phi_onnx.runtime.model import Model

log = logging.getLogger(__name__)

#: Most prompt tokens prefilled per step: the longest a newcomer stalls the running streams.
CHUNK = 256
#: Most top_logprobs a request may ask for (OpenAI's limit).
MAX_TOP_LOGPROBS = 20


def pool_bytes(folder: ModelFolder, max_batch: int, capacity: int | None = None) -> tuple[int, int]:
    """(tokens per slot, bytes) of the KV pool a Scheduler over `folder` allocates."""
    tokens = min(capacity or folder.default_max_length, folder.context_length)
    per_token = 2 * folder.num_layers * folder.num_kv_heads * folder.head_size * np.dtype(folder.kv_dtype).itemsize
    return tokens, per_token * tokens * max_batch


#: The machine's memory; then a container's limit (cgroup v2, v1): limit, usage, stat file, its inactive-file key.
MEMINFO = "/proc/meminfo"
CGROUPS = (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current", "/sys/fs/cgroup/memory.stat",
            "inactive_file"),
           ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes",
            "/sys/fs/cgroup/memory/memory.stat", "total_inactive_file"))


def available_memory() -> int | None:
    """Bytes of memory available now: MemAvailable from /proc/meminfo, or less where a container's
    memory limit leaves less (in a container /proc/meminfo shows the host's). None where neither is readable."""
    found = []
    try:
        with open(MEMINFO) as meminfo:
            found += [int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:")]
    except OSError:
        pass
    for limit_path, usage_path, stat_path, inactive in CGROUPS:
        try:
            with open(limit_path) as limit, open(usage_path) as usage:
                cap, used = limit.read().strip(), int(usage.read())
        except (OSError, ValueError):
            continue
        if cap.isdigit():
            # Reclaimable page cache counts as used in usage; the kernel drops it before an OOM kill.
            with contextlib.suppress(OSError, ValueError), open(stat_path) as stat:
                used -= next((int(line.split()[1]) for line in stat if line.split()[0] == inactive), 0)
            found.append(max(int(cap) - used, 0))
        break
    return min(found) if found else None


def check_pool_memory(nbytes: int, max_batch: int, capacity: int,
                      hint: str = "Lower max_batch or capacity (create_app / Scheduler).", reserved: int = 0) -> None:
    """Raise OptionsError when a CPU KV pool of `nbytes` would not fit in the memory available now,
    less `reserved` bytes still to be loaded (the weights, when checked before the model loads)."""
    available = available_memory()
    if available is not None and nbytes > 0.9 * (available - reserved):
        beside = f" beside the model's {reserved / 2**30:.1f} GiB of weights" if reserved else ""
        raise OptionsError(
            f"The KV cache for {max_batch} requests of {capacity} tokens needs {nbytes / 2**30:.1f} GiB, "
            f"but only {max(available - reserved, 0) / 2**30:.1f} GiB of memory is available{beside}.",
            hint=hint)


class QueueFullError(PhiOnnxError):
    """The scheduler's waiting queue is full; try again later."""


class SchedulerClosedError(PhiOnnxError):
    """The scheduler has stopped and accepts no more requests."""


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


Event = TokenEvent | FinishEvent


@dataclass(eq=False)
class Request:
    """A submitted request; iterate it for its events (blocking), or give `submit` a `sink`."""

    id: int
    prompt: list[int]
    options: GenerationOptions
    budget: int
    logprobs: int | None
    presence_penalty: float
    frequency_penalty: float
    sink: Callable[[Event], None]
    submitted_at: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    generated: list[int] = field(default_factory=list)
    finish: FinishEvent | None = None
    cancelled: bool = False
    # scheduler state
    slot: int | None = None
    long: bool = False  # whether the cache holds LongRoPE long-factor entries
    sampler: Sampler | None = field(default=None, repr=False)
    assembler: TextAssembler | None = field(default=None, repr=False)
    counts: np.ndarray | None = field(default=None, repr=False)
    _events: queue.Queue[Event] | None = field(default=None, repr=False)

    def cancel(self) -> None:
        """Stop this request at the next step (its slot is freed then)."""
        self.cancelled = True

    def __iter__(self) -> Iterator[Event]:
        if self._events is None:
            raise RuntimeError("this request streams to its sink; it cannot be iterated")
        while True:
            event = self._events.get()
            yield event
            if isinstance(event, FinishEvent):
                return

    def result(self) -> tuple[list[int], FinishEvent]:
        """Block until the end; (generated ids, the finish event)."""
        tokens = [e.token_id for e in self if isinstance(e, TokenEvent)]
        assert self.finish is not None
        return tokens, self.finish


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
        engine = model.engine
        if getattr(engine, "session", None) is None or model.backend != "ort":
            raise OptionsError(f"Continuous batching needs the ort backend; this model runs on {model.backend}.",
                               hint='Load it with phi_onnx.load(path, backend="ort").')
        if not 1 <= max_batch <= 256 or max_queue < 0 or chunk < 1:
            raise OptionsError(f"max_batch must be 1..256 and max_queue >= 0 (got {max_batch}, {max_queue}).",
                               hint="Use e.g. max_batch=8, max_queue=64.")
        folder = model.folder
        self.model = model
        self.session = engine.session
        self.kv_names: list[tuple[str, str]] = list(engine.kv_names)
        self.keeps_logits: bool = bool(engine.keeps_logits)
        self.threshold = folder.long_context_threshold
        self.vocab = folder.vocab_size
        self.eos = tuple(folder.eos_token_ids)
        self.pad = folder.pad_token_id
        self.max_batch, self.max_queue, self.chunk = max_batch, max_queue, chunk
        self.capacity, self.pool_bytes = pool_bytes(folder, max_batch, capacity)
        self._device = "cuda" if model.device.kind == "cuda" else "cpu"
        self._device_id = model.device.device_id if self._device == "cuda" else 0
        self._dtype = np.dtype(folder.kv_dtype)
        self._row_shape = [folder.num_kv_heads, self.capacity, folder.head_size]
        self._row_bytes = int(np.prod(self._row_shape)) * self._dtype.itemsize  # a slot's offset in a buffer
        if self._device == "cpu":
            check_pool_memory(self.pool_bytes, max_batch, self.capacity)
        self._pool = self._allocate()
        self._bases = [int(b.ctypes.data if isinstance(b, np.ndarray) else b.data_ptr()) for b in self._pool]
        self._bindings: dict[tuple[int, int], Any] = {}
        log.info("KV pool: %d slots x %d tokens, %d buffers, %.1f MiB on %s", max_batch, self.capacity,
                 len(self.kv_names), self.pool_bytes / 2**20, self._device)
        self.slots: list[Request | None] = [None] * max_batch
        self.filled = [0] * max_batch  # tokens whose keys/values each slot holds
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

    def check(self, prompt_tokens: int, max_new_tokens: int | None = None) -> None:
        """Raise PromptTooLongError unless `prompt_tokens` (+ `max_new_tokens`) fit one slot."""
        need = prompt_tokens + (max_new_tokens or 1)
        if prompt_tokens < 1 or need > self.capacity:
            raise PromptTooLongError(
                f"This server's context is {self.capacity} tokens; the request needs {need} "
                f"({prompt_tokens} in the prompt + {max_new_tokens or 1} to generate).",
                hint="Shorten the prompt or lower max_tokens.")

    def submit(self, prompt: Sequence[int], options: GenerationOptions | None = None, *,
               logprobs: int | None = None, presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
               sink: Callable[[Event], None] | None = None) -> Request:
        """Queue a request (token ids); returns its handle. Events go to `sink` (called on the
        scheduler thread, so it must be quick and thread-safe) or, without one, to the handle's iterator.

        Raises OptionsError / PromptTooLongError for a bad request, QueueFullError when the queue is full.
        """
        options = options or self.model.defaults
        ids = [int(t) for t in prompt]
        if not ids:
            raise OptionsError("The prompt is empty (0 tokens).", hint="Pass some text to continue.")
        bad = [t for t in ids if not 0 <= t < self.vocab]
        if bad:
            raise OptionsError(f"Token id {bad[0]} is outside the vocabulary (0..{self.vocab - 1}).",
                               hint="Pass token ids from this model's tokenizer.")
        self.check(len(ids))
        if logprobs is not None and not 0 <= logprobs <= MAX_TOP_LOGPROBS:
            raise OptionsError(f"top_logprobs must be 0..{MAX_TOP_LOGPROBS} (got {logprobs}).",
                               hint="Ask for at most 20 alternatives.")
        events: queue.Queue[Event] | None = None
        if sink is None:
            events = queue.Queue()
            sink = events.put
        request = Request(next(self._ids), ids, options, min(options.max_new_tokens, self.capacity - len(ids)),
                          logprobs, float(presence_penalty), float(frequency_penalty), sink, _events=events)
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
                request.slot, self.slots[slot], self.filled[slot] = slot, request, 0
                request.sampler = Sampler(request.options, self.eos, [request.prompt], self.vocab)
                request.assembler = TextAssembler(self.model.tokenizer, request.options.stop)
                if request.presence_penalty or request.frequency_penalty:
                    request.counts = np.zeros(self.vocab, dtype=np.float32)

    def step(self) -> None:
        """One scheduling step on the caller's thread (for tests and tools; `start()` runs them in a loop)."""
        with self._cond:
            self._admit()
        self._step()

    def _step(self) -> None:
        self.steps += 1
        budget = self.chunk
        for request in [r for r in self.slots if r is not None]:
            if budget <= 0:
                break
            slot = request.slot
            assert slot is not None
            if self.filled[slot] < len(request.prompt):
                budget -= self._prefill(request, budget)
        self._decode()

    def _is_long(self, length: int) -> bool:
        return self.threshold is not None and length > self.threshold

    def _prefill(self, request: Request, budget: int) -> int:
        """Run the next prompt chunk of `request` (at most `budget` tokens, except a first chunk that must
        cross the LongRoPE switch); sample its first token when the prompt is done. Returns tokens run."""
        slot = request.slot
        assert slot is not None
        start, total = self.filled[slot], len(request.prompt)
        end = min(total, start + budget)
        if start == 0 and self._is_long(total) and self.threshold is not None:
            end = max(end, self.threshold + 1)
            request.long = True
        logits = self._run(slot, slot + 1, np.asarray(request.prompt[start:end], dtype=np.int64)[None],
                           np.array([end]))
        self.filled[slot] = end
        if end == total:
            self._sample(request, logits[0])
        return end - start

    def _recompute(self, request: Request) -> None:
        """LongRoPE crossing: run the whole sequence again from an empty cache with the long factors."""
        self.recomputes += 1
        tokens = request.prompt + request.generated
        free = [s for s in range(self.max_batch) if self.slots[s] is None]
        if free:  # move next to the other long rows (the high slots), so decode runs stay contiguous
            old = request.slot
            assert old is not None
            self.slots[old], self.filled[old] = None, 0
            request.slot = free[-1]
            self.slots[free[-1]] = request
        slot = request.slot
        assert slot is not None and self.threshold is not None
        start, logits = 0, None
        while start < len(tokens):
            end = min(len(tokens), max(start + self.chunk, self.threshold + 1 if start == 0 else 0))
            logits = self._run(slot, slot + 1, np.asarray(tokens[start:end], dtype=np.int64)[None],
                               np.array([end]))
            start = end
        assert logits is not None
        request.long = True
        self.filled[slot] = len(tokens)
        self._sample(request, logits[0])

    def _decode(self) -> None:
        """One decode run per same-regime stretch of slots (one run unless LongRoPE rows of both regimes)."""
        decoding = {r.slot for r in self.slots if r is not None and r.generated and r.finish is None
                    and self.filled[r.slot or 0] == len(r.prompt) + len(r.generated) - 1}
        for slot in sorted(s for s in decoding if s is not None):
            request = self.slots[slot]
            assert request is not None
            if not request.long and self._is_long(self.filled[slot] + 1):
                decoding.discard(slot)
                self._recompute(request)
        regime = [None if r is None else r.long for r in self.slots]
        runs: list[list[int]] = []
        for slot in sorted(s for s in decoding if s is not None):
            if runs and all(regime[s] in (None, regime[slot]) for s in range(runs[-1][-1] + 1, slot)) \
                    and regime[runs[-1][0]] == regime[slot]:
                runs[-1].append(slot)
            else:
                runs.append([slot])
        for run in runs:
            lo, hi = run[0], run[-1] + 1
            ids = np.full((hi - lo, 1), self.pad, dtype=np.int64)
            for slot in run:
                request = self.slots[slot]
                assert request is not None
                ids[slot - lo, 0] = request.generated[-1]
            # Rows not decoding (free, or mid-prefill) write one throw-away entry at their next
            # position, which their own next run overwrites.
            valid = np.array([self.filled[s] + 1 for s in range(lo, hi)])
            logits = self._run(lo, hi, ids, valid)
            for slot in run:
                request = self.slots[slot]
                assert request is not None
                self.filled[slot] += 1
                self._sample(request, logits[slot - lo])

    # -- one run, sampling, events --------------------------------------------------------------
    def _allocate(self) -> list[Any]:
        import onnxruntime as ort

        shape = [self.max_batch, *self._row_shape]
        pool = []
        started = time.perf_counter()
        for _ in self.kv_names:
            if self._device == "cpu":
                # Written now, not left to calloc's lazy zero pages: GroupQueryAttention touches a slot's whole
                # row on its first run, which cost a newcomer 1.4 s per GiB of row (measured, 4096-token
                # slots of the 0.95B model) inside its time to first token; and the memory the log reports
                # is then really held, so the server cannot run out of it later. Zeros: stale NaN patterns
                # must not reach a kernel.
                buffer = np.empty(shape, dtype=self._dtype)
                buffer.fill(0)
                pool.append(buffer)
            else:
                pool.append(ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype=self._dtype), self._device,
                                                             self._device_id))
        log.debug("KV pool written in %.1f s", time.perf_counter() - started)
        return pool

    def _binding(self, lo: int, hi: int) -> Any:
        """An IO binding with rows [lo, hi) of every pool buffer as past and present (kept per range)."""
        binding = self._bindings.get((lo, hi))
        if binding is None:
            binding = self.session.io_binding()
            shape = [hi - lo, *self._row_shape]
            for (past, present), base in zip(self.kv_names, self._bases, strict=True):
                pointer = base + lo * self._row_bytes
                # Past and present are the same memory: GroupQueryAttention writes the new entries in place.
                binding.bind_input(past, self._device, self._device_id, self._dtype.type, shape, pointer)
                binding.bind_output(present, self._device, self._device_id, self._dtype.type, shape, pointer)
            self._bindings[lo, hi] = binding
        return binding

    def _run(self, lo: int, hi: int, input_ids: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """One session run over slots [lo, hi); returns the last position's logits per row [rows, vocab]."""
        rows, seq = input_ids.shape
        width = int(valid.max())
        if width > self.capacity:
            raise RuntimeError(f"slot of {self.capacity} tokens cannot hold {width}")  # a bug, not user error
        binding = self._binding(lo, hi)
        mask = (np.arange(width)[None, :] < valid[:, None]).astype(np.int64)
        keep = 1 if self.keeps_logits else seq
        logits = np.empty((rows, keep, self.vocab), dtype=np.float32)
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, dtype=np.int64))
        binding.bind_cpu_input("attention_mask", mask)
        if self.keeps_logits:
            binding.bind_cpu_input(LOGITS_TO_KEEP, np.array(keep, dtype=np.int64))
        binding.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        self.session.run_with_iobinding(binding)
        return logits[:, -1]

    def _sample(self, request: Request, logits: np.ndarray) -> None:
        assert request.sampler is not None and request.assembler is not None
        if request.finish is not None:  # finished while this step ran (closed, or its sink failed)
            return
        scores = logits[None]
        if request.counts is not None:
            scores = scores - (request.frequency_penalty * request.counts
                               + request.presence_penalty * (request.counts > 0))
        token = int(request.sampler(scores, len(request.generated))[0])
        request.sampler.observe(np.array([token]))
        if request.counts is not None:
            request.counts[token] += 1
        logprob, top = None, ()
        if request.logprobs is not None:
            shifted = logits.astype(np.float64) - logits.max()
            logp = shifted - np.log(np.exp(shifted).sum())
            logprob = float(logp[token])
            if request.logprobs:
                best = np.argpartition(-logp, request.logprobs - 1)[: request.logprobs]
                best = best[np.argsort(-logp[best], kind="stable")]
                top = tuple((int(t), float(logp[t])) for t in best)
        if request.first_token_at is None:
            request.first_token_at = time.perf_counter()
        request.generated.append(token)
        reason = None
        if token in self.eos:
            piece, reason = request.assembler.flush(), "eos"
        else:
            piece = request.assembler.push(token)
            if request.assembler.stopped:
                reason = "stop"
            elif len(request.generated) >= request.budget:
                reason = "length"
                piece += request.assembler.flush()
        self._emit(request, TokenEvent(token, piece, logprob, top))
        if reason:
            with self._cond:
                self._finish(request, reason)

    def _finish(self, request: Request, reason: str, error: str | None = None) -> None:
        """Free the request's slot and send its FinishEvent (call with the condition held)."""
        if request.finish is not None:
            return
        if request.slot is not None and self.slots[request.slot] is request:
            self.slots[request.slot], self.filled[request.slot] = None, 0
        request.slot = None
        text = request.assembler.text if request.assembler is not None else ""
        if reason in ("cancelled", "error") and request.assembler is not None:
            text = request.assembler.text[: request.assembler.emitted]
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
