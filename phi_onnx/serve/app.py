"""The FastAPI app: OpenAI's /v1/chat/completions and /v1/completions over the continuous-batching Scheduler."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import threading
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from phi_onnx.errors import OptionsError, PhiOnnxError
from phi_onnx.runtime.errors import PromptTooLongError
from phi_onnx.runtime.model import Model
from phi_onnx.runtime.scheduler import (
    CHUNK,
    Event,
    FinishEvent,
    QueueFullError,
    Scheduler,
    SchedulerClosedError,
    TokenEvent,
)
from phi_onnx.runtime.scheduler import Request as Job
from phi_onnx.serve.limits import max_chars_per_token
from phi_onnx.serve.metrics import CONTENT_TYPE, Metrics
from phi_onnx.serve.schema import ApiError, ChatRequest, CompletionRequest, check_api_key, load_json, parse
from phi_onnx.serve.security import HostOriginGate, allowed_host_set, browser_origins, cors_origin_set

log = logging.getLogger(__name__)

#: Largest request body accepted (413 beyond it).
MAX_BODY_BYTES = 4 * 1024 * 1024
#: Seconds a request body may take to arrive (408 after; slow or stalled uploads hold no connection for long).
BODY_TIMEOUT = 60.0
FINISH = {"eos": "stop", "stop": "stop", "length": "length"}
#: The chat page runs only its own scripts (static/), and model output rendered in it loads nothing remote.
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
            "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


class _State:
    def __init__(self) -> None:
        self.model: Model | None = None
        self.scheduler: Scheduler | None = None
        self.load_error: str | None = None
        self.chars_per_token: int | None = None  # see phi_onnx.serve.limits
        self.draining = False
        self.live: weakref.WeakSet[asyncio.Queue[Event | None]] = weakref.WeakSet()  # running requests' events

    def drain(self, grace: float) -> None:
        """Shutdown has begun: refuse new requests, and end those still running `grace` seconds from now.

        Called on the event loop (by `phi_onnx.serve.server.Server` on Ctrl-C / SIGTERM). A stream that is
        ended gets an error event and `data: [DONE]`; a non-streaming request, a 503.
        """
        if not self.draining:
            self.draining = True
            asyncio.get_running_loop().call_later(grace, self._expire)

    def _expire(self) -> None:
        for events in list(self.live):
            events.put_nowait(None)


def create_app(model: Model | Callable[[], Model], *, max_batch: int = 8, max_queue: int = 64,
               api_key: str | None = None, model_name: str | None = None, replica_name: str | None = None,
               capacity: int | None = None, chunk: int = CHUNK, max_body_bytes: int = MAX_BODY_BYTES,
               allowed_hosts: Sequence[str] | None = None, cors_origins: Sequence[str] | None = None,
               body_timeout: float = BODY_TIMEOUT, **kw: Any) -> FastAPI:
    """An ASGI app serving `model` with OpenAI's API; its lifespan starts and stops the scheduler.

    Args:
        model: a Model loaded with backend="ort", or a function returning one (then it loads in the
            background at startup and GET /health answers 503 until it is ready).
        max_batch: KV slots (requests decoded together); max_queue: requests waiting beyond them (503 after).
        api_key: when set, /v1 and /metrics need `Authorization: Bearer KEY`.
        model_name: the id under /v1/models (default: the export folder's name).
        replica_name: when set, every response carries `x-phi-onnx-replica: NAME` (Ray Serve).
        capacity: tokens per slot (default the export's max_length); chunk: prefill tokens per step.
        allowed_hosts: Host names served besides the loopback names and the address a connection came in on
            ("name" or "name:port"; "*": any). Other Hosts get 403 (DNS rebinding; see phi_onnx.serve.security).
        cors_origins: web origins ("https://app.example") whose pages may call the API from a browser: they get
            CORS headers and preflight answers. Requests with any other Origin but the server's own get 403.
        max_body_bytes: largest body (413 beyond); body_timeout: seconds a body may take to arrive (408 after).
    """
    if kw:
        raise TypeError(f"create_app() got unexpected keyword arguments: {', '.join(sorted(kw))}")
    check_api_key(api_key)
    hosts, origins = allowed_host_set(allowed_hosts), cors_origin_set(cors_origins)
    if not (isinstance(body_timeout, int | float) and math.isfinite(body_timeout) and body_timeout > 0):
        raise OptionsError(f"body_timeout must be a positive number of seconds, not {body_timeout!r}.")
    if isinstance(model, Model) and model.backend != "ort":
        raise OptionsError(f"Serving needs the ort backend (continuous batching); this model runs on {model.backend}.",
                           hint='Load it with phi_onnx.load(path, backend="ort").')
    state = _State()
    expected_key = api_key.encode() if api_key else None

    def ready(loaded: Model) -> None:
        scheduler = Scheduler(loaded, max_batch=max_batch, max_queue=max_queue, capacity=capacity, chunk=chunk)
        scheduler.start()
        state.chars_per_token = max_chars_per_token(loaded.path)
        state.model, state.scheduler = loaded, scheduler

    def load_in_background(loader: Callable[[], Model]) -> None:
        try:
            ready(loader())
        except Exception as error:  # shown by /health; the process keeps running so the reason is visible
            log.exception("loading the model failed")
            state.load_error = str(error)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if isinstance(model, Model):
            ready(model)
        else:
            threading.Thread(target=load_in_background, args=(model,), name="phi-onnx-load", daemon=True).start()
        yield
        if state.scheduler is not None:
            await asyncio.to_thread(state.scheduler.close)

    app = FastAPI(title="phi-onnx", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.phi_onnx = state

    def served_name() -> str:
        return model_name or (state.model.path.name if state.model else "phi-onnx")

    metrics = Metrics(lambda: state.scheduler, served_name)
    if origins != frozenset():  # CORS answers (headers, preflight) only for origins the operator named
        app.add_middleware(CORSMiddleware, allow_origins=browser_origins(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["*"], max_age=600)
    app.add_middleware(HostOriginGate, allowed_hosts=hosts, cors_origins=origins)  # outermost: before anything

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if error.status_code == 404 else None
        return JSONResponse(ApiError(error.status_code, str(error.detail), code=code).body(),
                            status_code=error.status_code)

    @app.middleware("http")
    async def guard(request: Request, call_next: Callable[[Request], Any]) -> Response:
        path = request.url.path
        if expected_key is not None and (path.startswith("/v1") or path == "/metrics"):
            given = request.headers.get("authorization", "")
            token = given[7:].encode() if given[:7].lower() == "bearer " else b""
            if not hmac.compare_digest(token, expected_key):
                response: Response = JSONResponse(ApiError(
                    401, "Incorrect or missing API key: send 'Authorization: Bearer KEY'.",
                    code="invalid_api_key").body(), status_code=401)
            else:
                response = await call_next(request)
        else:
            response = await call_next(request)
        if path in ("/v1/chat/completions", "/v1/completions") and request.method == "POST":
            endpoint = "chat_completions" if path == "/v1/chat/completions" else "completions"
            metrics.count_request(endpoint, response.status_code)
        if replica_name is not None:
            response.headers["x-phi-onnx-replica"] = replica_name
        return response

    def scheduler() -> tuple[Model, Scheduler]:
        if state.draining:
            raise ApiError(503, "The server is shutting down.", type="server_error", code="shutting_down")
        if state.model is None or state.scheduler is None:
            raise ApiError(503, "The model is still loading." if not state.load_error else
                           f"The model failed to load: {state.load_error}", type="server_error",
                           code="model_not_ready", headers={"Retry-After": "5"})
        return state.model, state.scheduler

    @app.get("/health")
    async def health() -> JSONResponse:
        if state.scheduler is None:
            return JSONResponse({"status": "error" if state.load_error else "loading", "error": state.load_error},
                                status_code=503)
        if not state.scheduler.alive:
            return JSONResponse({"status": "error", "error": state.scheduler.failure}, status_code=503)
        return JSONResponse({"status": "ok", "active": state.scheduler.active, "queued": state.scheduler.queued})

    @app.get("/metrics")
    async def metrics_page() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        scheduler()
        return {"object": "list", "data": [{"id": served_name(), "object": "model", "created": int(time.time()),
                                            "owned_by": "phi-onnx"}]}

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(resources.files("phi_onnx.serve").joinpath("static/index.html").read_text("utf-8"),
                            headers={"Content-Security-Policy": PAGE_CSP})

    app.mount("/assets", StaticFiles(packages=[("phi_onnx.serve", "static/assets")]), name="assets")

    async def body_of(request: Request) -> Any:
        _check_content_type(request.headers.get("content-type"))
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > max_body_bytes:
            raise ApiError(413, f"The request body is over {max_body_bytes} bytes.", code="request_too_large")
        data = bytearray()

        async def read() -> None:
            async for piece in request.stream():
                data.extend(piece)
                if len(data) > max_body_bytes:
                    raise ApiError(413, f"The request body is over {max_body_bytes} bytes.", code="request_too_large")

        try:
            await asyncio.wait_for(read(), body_timeout)
        except asyncio.TimeoutError:
            raise ApiError(408, f"The request body did not arrive within {body_timeout:g} seconds.",
                           code="request_timeout", headers={"Connection": "close"}) from None
        return load_json(bytes(data))

    def check_length(characters: int, max_tokens: int | None, chat: bool) -> None:
        """400 for a prompt too long to fit whatever its text, before it is tokenized (phi_onnx.serve.limits)."""
        per_token, sched = state.chars_per_token, state.scheduler
        if per_token is None or sched is None:
            return
        room = sched.capacity - (max_tokens or 1)
        if room > 0 and characters > room * per_token:  # room <= 0: respond() says max_tokens is too large
            raise ApiError(400, f"This model's maximum context length is {sched.capacity} tokens. However, your "
                           f"prompt's {characters} characters need more than the {room} tokens left beside "
                           f"{max_tokens or 1} for the completion (a token of this model covers at most {per_token} "
                           "characters). Please reduce the prompt or the completion length.",
                           param="messages" if chat else "prompt", code="context_length_exceeded")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body: ChatRequest = parse(ChatRequest, await body_of(request))
        loaded, _ = scheduler()
        check_length(body.characters(), body.max_completion_tokens or body.max_tokens, True)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        try:
            # Rendering and tokenizing a large body takes a while: off the event loop.
            prompt = await asyncio.to_thread(loaded.chat_prompt_ids, messages)
        except PhiOnnxError as error:
            raise ApiError(400, error.message, param="messages") from None
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        return await respond(request, body, prompt, body.max_completion_tokens or body.max_tokens, logprobs, True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body: CompletionRequest = parse(CompletionRequest, await body_of(request))
        loaded, _ = scheduler()
        text = body.text()
        if text is not None:
            check_length(len(text), body.max_tokens, False)
        prompt = await asyncio.to_thread(loaded.encode, text) if text is not None else list(body.prompt)
        return await respond(request, body, prompt, body.max_tokens, body.logprobs, False)

    async def respond(request: Request, body: Any, prompt: list[int], max_tokens: int | None,
                      logprobs: int | None, chat: bool) -> Response:
        loaded, sched = scheduler()
        if body.model is not None and body.model != served_name():
            raise ApiError(404, f"The model '{_shown(body.model)}' does not exist; this server serves "
                           f"'{served_name()}'.",
                           param="model", code="model_not_found")
        if not prompt:
            raise ApiError(400, "The prompt is empty.", param="messages" if chat else "prompt")
        need = len(prompt) + (max_tokens or 1)
        if need > sched.capacity:
            raise ApiError(400, f"This model's maximum context length is {sched.capacity} tokens. However, you "
                           f"requested {need} tokens ({len(prompt)} in the prompt, {max_tokens or 1} for the "
                           "completion). Please reduce the prompt or the completion length.",
                           param="messages" if chat else "prompt", code="context_length_exceeded")
        budget = max_tokens or sched.capacity - len(prompt)
        try:
            options = loaded.options(
                max_new_tokens=budget, min_new_tokens=budget if body.ignore_eos else min(body.min_tokens, budget),
                temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, seed=body.seed,
                repetition_penalty=body.repetition_penalty, stop=body.stops())
        except PhiOnnxError as error:
            raise ApiError(400, error.message) from None
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event | None] = asyncio.Queue()  # None: shutdown's grace is over (_State.drain)
        tracked = metrics.track()

        def sink(event: Event) -> None:
            tracked.event(event)
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop has closed (shutdown): nobody is listening any more
                for job in job_box:
                    job.cancel()

        job_box: list[Job] = []
        try:
            job = sched.submit(prompt, options, logprobs=logprobs, presence_penalty=body.presence_penalty,
                               frequency_penalty=body.frequency_penalty, sink=sink)
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
        job_box.append(job)
        tracked.submitted(job, len(prompt))
        state.live.add(events)
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        reply = _Reply(loaded, served_name(), ident, chat, logprobs)

        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(_stream(job, events, reply, usage, state.live),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        async def watch() -> None:
            # Request.is_disconnected() never sees a disconnect behind the http middleware (its receive,
            # called in a cancelled scope, gives up at once), so wait for the message itself.
            while (await request.receive())["type"] != "http.disconnect":
                pass
            job.cancel()

        watcher = asyncio.create_task(watch())
        tokens: list[TokenEvent] = []
        try:
            while True:
                event = await events.get()
                if event is None:
                    raise _shutting_down()
                if isinstance(event, FinishEvent):
                    break
                tokens.append(event)
        finally:
            watcher.cancel()
            job.cancel()  # a no-op once finished; frees the slot when this task is cancelled
            state.live.discard(events)
        if event.reason == "cancelled" and watcher.done() and not watcher.cancelled():
            return Response(status_code=499)  # the client went away; nobody reads this
        if event.reason not in FINISH:
            raise ApiError(500, f"Generation failed: {event.error or event.reason}.", type="server_error")
        return JSONResponse(reply.whole(tokens, event))

    return app


class _Reply:
    """Builds OpenAI's response and chunk objects for one request."""

    def __init__(self, model: Model, name: str, ident: str, chat: bool, logprobs: int | None) -> None:
        self.model, self.name, self.id, self.chat, self.logprobs = model, name, ident, chat, logprobs
        self.created = int(time.time())

    def _token(self, token_id: int) -> str:
        return self.model.tokenizer.decode([token_id], skip_special_tokens=False)

    def _logprobs(self, tokens: list[TokenEvent]) -> dict[str, Any] | None:
        if self.logprobs is None:
            return None
        if self.chat:
            def entry(t: int, lp: float) -> dict[str, Any]:
                text = self._token(t)
                return {"token": text, "logprob": lp, "bytes": list(text.encode())}

            return {"content": [{**entry(e.token_id, e.logprob or 0.0),
                                 "top_logprobs": [entry(t, lp) for t, lp in e.top_logprobs]} for e in tokens]}
        return {"tokens": [self._token(e.token_id) for e in tokens],
                "token_logprobs": [e.logprob for e in tokens],
                "top_logprobs": [{self._token(t): lp for t, lp in e.top_logprobs} for e in tokens],
                "text_offset": []}

    def _usage(self, finish: FinishEvent) -> dict[str, int]:
        return {"prompt_tokens": finish.prompt_tokens, "completion_tokens": finish.completion_tokens,
                "total_tokens": finish.prompt_tokens + finish.completion_tokens}

    def _head(self, chunk: bool) -> dict[str, Any]:
        kind = ("chat.completion" if self.chat else "text_completion") + (".chunk" if chunk and self.chat else "")
        return {"id": self.id, "object": kind, "created": self.created, "model": self.name}

    def whole(self, tokens: list[TokenEvent], finish: FinishEvent) -> dict[str, Any]:
        """The non-streaming response."""
        choice: dict[str, Any] = {"index": 0, "finish_reason": FINISH[finish.reason],
                                  "logprobs": self._logprobs(tokens)}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": finish.text}
        else:
            choice["text"] = finish.text
        return {**self._head(False), "choices": [choice], "usage": self._usage(finish)}

    def chunk(self, text: str | None, tokens: list[TokenEvent], finish: str | None, usage: bool,
              role: bool = False) -> str:
        """One SSE `data:` line with a delta."""
        choice: dict[str, Any] = {"index": 0, "logprobs": self._logprobs(tokens) if tokens else None,
                                  "finish_reason": finish}
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choice["delta"] = delta
        else:
            choice["text"] = text or ""
        body = {**self._head(True), "choices": [choice]}
        if usage:
            body["usage"] = None
        return f"data: {json.dumps(body)}\n\n"

    def usage_chunk(self, finish: FinishEvent) -> str:
        """The final chunk of stream_options.include_usage: empty choices, the usage."""
        return f"data: {json.dumps({**self._head(True), 'choices': [], 'usage': self._usage(finish)})}\n\n"


def _shutting_down() -> ApiError:
    return ApiError(503, "The server is shutting down, and this request was still running when the grace period "
                    "(--grace) ended; it was stopped.", type="server_error", code="shutting_down")


async def _stream(job: Job, events: asyncio.Queue[Event | None], reply: _Reply, usage: bool,
                  live: weakref.WeakSet[asyncio.Queue[Event | None]]) -> AsyncIterator[str]:
    """SSE: a role chunk (chat), content deltas, a finish chunk, the usage chunk if asked, [DONE].

    Ended by shutdown (a None event): an error event, then [DONE].
    """
    try:
        if reply.chat:
            yield reply.chunk("", [], None, usage, role=True)
        while True:
            event = await events.get()
            if event is None:
                yield f"data: {json.dumps(_shutting_down().body())}\n\n"
                yield "data: [DONE]\n\n"
                return
            if isinstance(event, FinishEvent):
                break
            if event.text or reply.logprobs is not None:
                yield reply.chunk(event.text, [event], None, usage)
        if event.reason not in FINISH:
            error = ApiError(500, f"Generation failed: {event.error or event.reason}.", type="server_error")
            yield f"data: {json.dumps(error.body())}\n\n"
        else:
            yield reply.chunk(None, [], FINISH[event.reason], usage)
            if usage:
                yield reply.usage_chunk(event)
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()  # the client went away (this generator was cancelled or closed): free the slot
        live.discard(events)


def _shown(text: str, limit: int = 100) -> str:
    """Client text quoted in a message, cut short: an error must not echo megabytes back."""
    return text if len(text) <= limit else text[:limit] + "..."


def _check_content_type(value: str | None) -> None:
    """415 unless the body is declared JSON: a page on another site cannot send that without a CORS preflight."""
    media, *params = (value or "").split(";")
    charset = next((v.strip().strip('"').lower() for k, _, v in (p.partition("=") for p in params)
                    if k.strip().lower() == "charset"), "utf-8")
    if media.strip().lower() != "application/json" or charset not in ("utf-8", "utf8"):
        shown = f"'{value[:100]}'" if value else "none"
        raise ApiError(415, f"The request body must be JSON sent as 'Content-Type: application/json' (UTF-8); the "
                       f"Content-Type was {shown}.", code="unsupported_media_type")
