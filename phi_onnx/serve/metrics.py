"""The server's Prometheus series at /metrics, each labelled with the served `model`.

Per request (recorded on the scheduler thread as the request's events are emitted, so a stream whose
client went away is still counted): time to first token, inter-token latency, end-to-end latency,
queue time, prompt and generated tokens, the finish reason. Read at each scrape: requests running and
waiting, the KV pool's slots, tokens and bytes. The HTTP middleware counts answers by endpoint and status.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from phi_onnx.runtime.scheduler import Event, FinishEvent, TokenEvent

if TYPE_CHECKING:
    from phi_onnx.runtime.scheduler import Request, Scheduler

__all__ = ["CONTENT_TYPE", "FINISH_REASONS", "Metrics", "RequestMetrics"]

#: The /metrics response's media type (Prometheus text format).
CONTENT_TYPE = CONTENT_TYPE_LATEST
#: The scheduler's finish reasons as the `reason` label (OpenAI's finish_reason where the API has one).
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "cancelled", "error": "error"}

_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)  # time to first token (unchanged)
_INTER_TOKEN = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5)
_END_TO_END = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200)
_QUEUE = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TOKENS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)


class Metrics:
    """The /metrics series of one app, in a registry of their own.

    Args:
        scheduler: returns the running Scheduler, or None while the model loads (the gauges read 0).
        model: returns the served model's name, the `model` label.
    """

    def __init__(self, scheduler: Callable[[], Scheduler | None], model: Callable[[], str]) -> None:
        self.registry = CollectorRegistry()
        self.model = model
        r = self.registry
        label = ["model"]
        self.requests = Counter("phi_onnx_requests", "Completion requests answered, by endpoint and HTTP status.",
                                ["endpoint", "status", "model"], registry=r)
        self.generated = Counter("phi_onnx_generated_tokens", "Tokens generated.", label, registry=r)
        self.prompt = Counter("phi_onnx_prompt_tokens", "Prompt tokens processed.", label, registry=r)
        self.ttft = Histogram("phi_onnx_time_to_first_token_seconds", "Time from request to first token.",
                              label, buckets=_LATENCY, registry=r)
        self.inter_token = Histogram("phi_onnx_inter_token_latency_seconds",
                                     "Time between two consecutive tokens of one request.", label,
                                     buckets=_INTER_TOKEN, registry=r)
        self.end_to_end = Histogram("phi_onnx_e2e_request_latency_seconds",
                                    "Time from request to its end (any finish reason).", label,
                                    buckets=_END_TO_END, registry=r)
        self.queue = Histogram("phi_onnx_request_queue_time_seconds",
                               "Time from submission to the scheduler until the request's first step (the "
                               "end of its prefill) or its end if it never got one.", label,
                               buckets=_QUEUE, registry=r)
        self.prompt_per_request = Histogram("phi_onnx_request_prompt_tokens", "Prompt tokens per request.", label,
                                            buckets=_TOKENS, registry=r)
        self.generated_per_request = Histogram("phi_onnx_request_generation_tokens",
                                               "Tokens generated per request.", label, buckets=_TOKENS, registry=r)
        self.finished = Counter("phi_onnx_finished_requests", "Requests ended, by finish reason (stop, length, "
                                "cancelled, error).", ["reason", "model"], registry=r)
        r.register(_PoolCollector(scheduler, model))

    def count_request(self, endpoint: str, status: int) -> None:
        """Count one answered completion request (called by the HTTP middleware)."""
        self.requests.labels(endpoint, str(status), self.model()).inc()

    def track(self) -> RequestMetrics:
        """Start timing one request now (before it is submitted); feed it the request's events."""
        return RequestMetrics(self, self.model())

    def exposition(self) -> bytes:
        """The series in Prometheus' text format (CONTENT_TYPE)."""
        return generate_latest(self.registry)


class RequestMetrics:
    """One request's timings; `event` is called with each of its events on the scheduler thread."""

    def __init__(self, metrics: Metrics, model: str) -> None:
        self.metrics, self.model = metrics, model
        self.started = time.perf_counter()
        self.job: Request | None = None
        self._last: float | None = None
        self._ended: float | None = None
        # `submit` returns the job to the event loop while the scheduler thread may already be finishing
        # it: whichever of the two comes second records the queue time.
        self._lock = threading.Lock()

    def submitted(self, job: Request, prompt_tokens: int) -> None:
        """The scheduler accepted the request (a refused one counts in no per-request series)."""
        with self._lock:
            self.job, ended = job, self._ended
        self.metrics.prompt.labels(self.model).inc(prompt_tokens)
        if ended is not None:
            self._queued(job, ended)

    def event(self, event: Event) -> None:
        """Record a TokenEvent (time to first token, inter-token gap) or the FinishEvent (the rest)."""
        now = time.perf_counter()
        m, model = self.metrics, self.model
        if isinstance(event, TokenEvent):
            if self._last is None:
                m.ttft.labels(model).observe(now - self.started)
            else:
                m.inter_token.labels(model).observe(now - self._last)
            self._last = now
            return
        assert isinstance(event, FinishEvent)
        m.end_to_end.labels(model).observe(now - self.started)
        m.generated.labels(model).inc(event.completion_tokens)
        m.prompt_per_request.labels(model).observe(event.prompt_tokens)
        m.generated_per_request.labels(model).observe(event.completion_tokens)
        m.finished.labels(FINISH_REASONS.get(event.reason, event.reason), model).inc()
        with self._lock:
            job, self._ended = self.job, now
        if job is not None:
            self._queued(job, now)

    def _queued(self, job: Request, ended: float) -> None:
        # Submission to admission into a slot (the prefill is not queue time); a request that ended
        # without being admitted waited all along.
        admitted = getattr(job, "admitted_at", None) or job.first_token_at or ended
        self.metrics.queue.labels(self.model).observe(max(admitted - job.submitted_at, 0.0))


class _PoolCollector:
    """Gauges read from the scheduler at each scrape: requests running and waiting, the KV pool's use."""

    def __init__(self, scheduler: Callable[[], Scheduler | None], model: Callable[[], str]) -> None:
        self.scheduler, self.model = scheduler, model

    def describe(self) -> Iterator[Metric]:
        yield from self._families(None, "")

    def collect(self) -> Iterator[Metric]:
        yield from self._families(self.scheduler(), self.model())

    @staticmethod
    def _families(s: Any, model: str) -> Iterator[Metric]:
        store = getattr(s, "store", None)
        model_object = getattr(s, "model", None)
        lora = getattr(getattr(model_object, "core", None), "lora", None)  # None: no switchable adapters
        values = [
            ("phi_onnx_active_requests", "Requests holding a KV slot.", s.active if s else 0),
            ("phi_onnx_queued_requests", "Requests waiting for a KV slot.", s.queued if s else 0),
            ("phi_onnx_kv_slots_used", "KV pool slots held by a request.", s.active if s else 0),
            ("phi_onnx_kv_slots_capacity", "KV pool slots (requests decoded together).", s.max_batch if s else 0),
            ("phi_onnx_kv_tokens_used", "Tokens whose keys and values the KV pool holds for running requests.",
             getattr(s, "held_tokens", None) if s else 0),
            ("phi_onnx_prefix_cache_slot_tokens", "Tokens kept in free slots for prefix reuse.",
             getattr(s, "idle_tokens", None) if s else 0),
            ("phi_onnx_prefix_store_bytes", "Bytes of prompt prefixes kept in the prefix store.",
             store.nbytes if store is not None else (None if s else 0)),
            ("phi_onnx_prefix_store_blocks", "Blocks of prompt tokens (shared by the prefixes that start with "
             "them) kept in the prefix store.", store.blocks if store is not None else (None if s else 0)),
            ("phi_onnx_kv_tokens_capacity", "Tokens the KV pool can hold (slots x tokens per slot).",
             s.max_batch * s.capacity if s else 0),
            ("phi_onnx_kv_pool_bytes", "Bytes allocated for the KV pool.", s.pool_bytes if s else 0),
            ("phi_onnx_lora_adapters_loaded", "Switchable LoRA adapters whose tensors are in memory.",
             len(lora.loaded) if lora is not None else (None if s else 0)),
            ("phi_onnx_lora_adapters_max", "Most switchable LoRA adapters kept loaded (--max-adapters; no sample: "
             "unbounded).", lora.max_loaded if lora is not None else None),
        ]
        for name, documentation, value in values:
            family = GaugeMetricFamily(name, documentation, labels=["model"])
            if model and value is not None:
                family.add_metric([model], value)
            yield family
        counts = [
            ("phi_onnx_prompt_tokens_reused", "Prompt tokens a request found in its own slot.", "reused_tokens"),
            ("phi_onnx_prompt_tokens_copied", "Prompt tokens copied from another slot or the prefix store.",
             "copied_tokens"),
            ("phi_onnx_prompt_tokens_computed", "Prompt tokens prefilled.", "computed_tokens"),
        ]
        for name, documentation, attribute in counts:
            counter = CounterMetricFamily(name, documentation, labels=["model"])
            value = getattr(s, attribute, None) if s else 0
            if model and value is not None:
                counter.add_metric([model], value)
            yield counter
