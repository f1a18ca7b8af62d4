"""The engine client: async generation over the Scheduler's thread, apart from HTTP.

The Scheduler decodes on its own thread and calls a request's sink there; `EngineClient.generate`
hands each event to the event loop (`call_soon_threadsafe`) as an async stream, cancels the request
when its consumer goes away, and ends every running stream when shutdown's grace is over (`drain`).
It also owns the model's lifecycle: loaded now or in the background, the scheduler started and closed.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING

from phi_onnx.errors import PhiOnnxError
from phi_onnx.runtime.errors import PromptTooLongError
from phi_onnx.runtime.model import Model
from phi_onnx.runtime.options import GenerationOptions
from phi_onnx.runtime.scheduler import (
    Event,
    FinishEvent,
    QueueFullError,
    Scheduler,
    SchedulerClosedError,
    TokenEvent,
)
from phi_onnx.runtime.scheduler import Request as Job
from phi_onnx.serve.limits import max_chars_per_token
from phi_onnx.serve.schema import ApiError

if TYPE_CHECKING:
    from phi_onnx.serve.config import ServeConfig
    from phi_onnx.serve.metrics import Metrics

log = logging.getLogger(__name__)


class ShuttingDown(Exception):
    """Shutdown's grace ended while this request was still running (`EngineClient.drain`)."""


def shutting_down_error() -> ApiError:
    """The 503 (or stream error event) for a request ended by shutdown."""
    return ApiError(503, "The server is shutting down, and this request was still running when the grace period "
                    "(--grace) ended; it was stopped.", type="server_error", code="shutting_down")


class Generation:
    """One submitted request: its events as an async stream (`events()`), and `cancel()`.

    Created by `EngineClient.generate`; the scheduler thread feeds it through `_sink`.
    """

    def __init__(self, client: EngineClient, loop: asyncio.AbstractEventLoop) -> None:
        self.client, self.loop = client, loop
        self.queue: asyncio.Queue[Event | None] = asyncio.Queue()  # None: shutdown's grace is over
        self.job: Job | None = None
        self.prompt_tokens = 0
        self.tracked = client.metrics.track() if client.metrics is not None else None

    def _sink(self, event: Event) -> None:
        """Called on the scheduler thread: must be quick and must not raise."""
        if self.tracked is not None:
            self.tracked.event(event)
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the event loop has closed (shutdown): nobody is listening any more
            self.cancel()

    def cancel(self) -> None:
        """Stop the request and free its slot (a no-op once it finished)."""
        if self.job is not None:
            self.job.cancel()

    async def events(self) -> AsyncIterator[TokenEvent | FinishEvent]:
        """Each TokenEvent, then the FinishEvent. Cancels the request when the consumer stops early
        (the client went away). Raises ShuttingDown when shutdown's grace ends first."""
        try:
            while True:
                event = await self.queue.get()
                if event is None:
                    raise ShuttingDown
                yield event
                if isinstance(event, FinishEvent):
                    return
        finally:
            self.cancel()  # a no-op once finished; frees the slot when the consumer was cancelled
            self.client.live.discard(self)


class EngineClient:
    """The served model and its Scheduler, for the HTTP layer (one per app).

    Args:
        model: a Model, or a function returning one (then `start` loads it on a background thread and
            `ready` is False until it has loaded; `load_error` says why it failed).
        config: the batch, queue, capacity and chunk of the Scheduler.
        metrics: where each request's timings go (optional).
    """

    def __init__(self, model: Model | Callable[[], Model], config: ServeConfig, metrics: Metrics | None = None) -> None:
        self.source, self.config, self.metrics = model, config, metrics
        self.model: Model | None = None
        self.scheduler: Scheduler | None = None
        self.load_error: str | None = None
        self.chars_per_token: int | None = None  # see phi_onnx.serve.limits
        self.draining = False
        self.live: weakref.WeakSet[Generation] = weakref.WeakSet()  # running requests

    # Lifecycle --------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start serving: now for a loaded Model, else load it on a background thread."""
        if isinstance(self.source, Model):
            self._ready(self.source)
        else:
            threading.Thread(target=self._load_in_background, args=(self.source,), name="phi-onnx-load",
                             daemon=True).start()

    def _ready(self, loaded: Model) -> None:
        c = self.config
        chunk = {} if c.chunk is None else {"chunk": c.chunk}
        scheduler = Scheduler(loaded, max_batch=c.max_batch, max_queue=c.max_queue, capacity=c.capacity,
                              prefix_cache=c.prefix_cache, prefix_cache_bytes=c.prefix_cache_bytes,
                              stall_factor=c.stall_factor, cohort_tokens=c.cohort_tokens, **chunk)
        if c.max_adapters is not None and loaded.core.lora is not None:
            loaded.core.lora.max_loaded = c.max_adapters
        scheduler.start()
        self.chars_per_token = max_chars_per_token(loaded.path)
        self.model, self.scheduler = loaded, scheduler

    def _load_in_background(self, loader: Callable[[], Model]) -> None:
        try:
            self._ready(loader())
        except Exception as error:  # shown by /health; the process keeps running so the reason is visible
            log.exception("loading the model failed")
            self.load_error = str(error)

    async def close(self) -> None:
        """Stop the scheduler (off the event loop: it joins its thread)."""
        if self.scheduler is not None:
            await asyncio.to_thread(self.scheduler.close)

    def drain(self, grace: float) -> None:
        """Shutdown has begun: refuse new requests, and end those still running `grace` seconds from now.

        Called on the event loop (by `phi_onnx.serve.server.Server` on Ctrl-C / SIGTERM). A stream that is
        ended gets an error event and `data: [DONE]`; a non-streaming request, a 503.
        """
        if not self.draining:
            self.draining = True
            asyncio.get_running_loop().call_later(grace, self._expire)

    def _expire(self) -> None:
        for generation in list(self.live):
            generation.queue.put_nowait(None)

    # Requests ---------------------------------------------------------------------------------------------

    def engine(self) -> tuple[Model, Scheduler]:
        """The model and scheduler; a 503 while shutting down, loading, or after the load failed."""
        if self.draining:
            raise ApiError(503, "The server is shutting down.", type="server_error", code="shutting_down")
        if self.model is None or self.scheduler is None:
            raise ApiError(503, "The model is still loading." if not self.load_error else
                           f"The model failed to load: {self.load_error}", type="server_error",
                           code="model_not_ready", headers={"Retry-After": "5"})
        return self.model, self.scheduler

    def generate(self, prompt: Sequence[int], options: GenerationOptions) -> Generation:
        """Submit `prompt` (token ids) to the scheduler (call on the event loop); its events come through
        the returned Generation. A refusal is an ApiError: 503 when the queue is full or the scheduler
        stopped, 400 for a prompt the scheduler refuses."""
        _, sched = self.engine()
        generation = Generation(self, asyncio.get_running_loop())
        try:
            job = sched.submit(prompt, options, sink=generation._sink)
        except QueueFullError as error:
            raise ApiError(503, error.message, type="server_error", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        except SchedulerClosedError as error:
            raise ApiError(503, error.message, type="server_error",
                           code="shutting_down" if sched.alive else "scheduler_failed") from None
        except PromptTooLongError as error:
            raise ApiError(400, error.message, code="context_length_exceeded") from None
        except PhiOnnxError as error:
            raise ApiError(400, error.message, param="prompt") from None
        generation.job, generation.prompt_tokens = job, len(prompt)
        if generation.tracked is not None:
            generation.tracked.submitted(job, len(prompt))
        self.live.add(generation)
        return generation
