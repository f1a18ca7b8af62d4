"""The FastAPI app: OpenAI's /v1/chat/completions and /v1/completions over the continuous-batching Scheduler."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from phi_onnx.errors import OptionsError
from phi_onnx.runtime.model import Model
from phi_onnx.runtime.scheduler import Scheduler
from phi_onnx.serve.config import APP_FIELDS, DEFAULTS, ServeConfig
from phi_onnx.serve.engine_client import EngineClient
from phi_onnx.serve.metrics import CONTENT_TYPE, Metrics
from phi_onnx.serve.schema import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    ResponsesRequest,
    check_api_key,
    load_json,
    parse,
    parse_responses,
)
from phi_onnx.serve.security import HostOriginGate, allowed_host_set, browser_origins, cors_origin_set
from phi_onnx.serve.serving_chat import OpenAIServingChat
from phi_onnx.serve.serving_completions import OpenAIServingCompletion
from phi_onnx.serve.serving_engine import shown
from phi_onnx.serve.serving_responses import OpenAIServingResponses

log = logging.getLogger(__name__)
#: The POST endpoints counted in the request metrics, by path.
ENDPOINTS = {"/v1/chat/completions": "chat_completions", "/v1/completions": "completions",
             "/v1/responses": "responses"}

#: Largest request body accepted (413 beyond it); seconds a body may take to arrive (408 after). See ServeConfig.
MAX_BODY_BYTES, BODY_TIMEOUT = DEFAULTS.max_body_bytes, DEFAULTS.body_timeout
#: The chat page runs only its own scripts (static/), and model output rendered in it loads nothing remote.
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
            "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


class _State:
    """`app.state.phi_onnx`: the engine client under the names the server and tests read."""

    def __init__(self, client: EngineClient) -> None:
        self.client = client

    @property
    def model(self) -> Model | None:
        return self.client.model

    @property
    def scheduler(self) -> Scheduler | None:
        return self.client.scheduler

    @property
    def load_error(self) -> str | None:
        return self.client.load_error

    def drain(self, grace: float) -> None:
        """See `EngineClient.drain` (called by `phi_onnx.serve.server.Server` on Ctrl-C / SIGTERM)."""
        self.client.drain(grace)


def create_app(model: Model | Callable[[], Model], config: ServeConfig | None = None, **options: Any) -> FastAPI:
    """An ASGI app serving `model` with OpenAI's API; its lifespan starts and stops the scheduler.

    Args:
        model: a Model loaded with backend="ort", or a function returning one (then it loads in the
            background at startup and GET /health answers 503 until it is ready).
        config: a ServeConfig (phi_onnx.serve.config); keyword `options` override its fields:
        max_batch: KV slots (requests decoded together); max_queue: requests waiting beyond them (503 after).
        api_key: when set, /v1 and /metrics need `Authorization: Bearer KEY`.
        model_name: the id under /v1/models (default: the export folder's name).
        model_aliases: more ids the model answers to (listed under /v1/models; `model` may be any).
        replica_name: when set, every response carries `x-phi-onnx-replica: NAME` (Ray Serve).
        capacity: tokens per slot (default the export's max_length); chunk: prefill tokens per step.
        allowed_hosts: Host names served besides the loopback names and the address a connection came in on
            ("name" or "name:port"; "*": any). Other Hosts get 403 (DNS rebinding; see phi_onnx.serve.security).
        cors_origins: web origins ("https://app.example") whose pages may call the API from a browser: they get
            CORS headers and preflight answers. Requests with any other Origin but the server's own get 403.
        max_body_bytes: largest body (413 beyond); body_timeout: seconds a body may take to arrive (408 after).
        prefix_cache, prefix_cache_bytes: prompt prefix reuse across requests and the prefix store's budget.
        stall_factor: while streams decode, a step's prefill takes about this many decode steps.
        cohort_tokens: cold prompts arriving together while nothing streams start decoding together, up to this
            many prompt tokens to compute (0: each starts as soon as its prompt is in).
    """
    unknown = sorted(set(options) - set(APP_FIELDS))
    if unknown:
        raise TypeError(f"create_app() got unexpected keyword arguments: {', '.join(unknown)}")
    config = ServeConfig.of(config, **options)
    check_api_key(config.api_key)
    hosts, origins = allowed_host_set(config.allowed_hosts), cors_origin_set(config.cors_origins)
    if isinstance(model, Model) and model.backend != "ort":
        raise OptionsError(f"Serving needs the ort backend (continuous batching); this model runs on {model.backend}.",
                           hint='Load it with phi_onnx.load(path, backend="ort").')
    expected_key = config.api_key.encode() if config.api_key else None
    replica_name, max_body_bytes, body_timeout = config.replica_name, config.max_body_bytes, config.body_timeout
    client = EngineClient(model, config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client.start()
        yield
        await client.close()

    app = FastAPI(title="phi-onnx", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.phi_onnx = _State(client)
    created = int(time.time())

    def served_name() -> str:
        return config.model_name or (client.model.path.name if client.model else "phi-onnx")

    def served_names() -> list[str]:
        """The model's names, then its switchable LoRA adapters' (each a model id that selects it)."""
        adapters = client.model.adapters if client.model else ()
        return list(dict.fromkeys([served_name(), *config.model_aliases, *adapters]))

    metrics = Metrics(lambda: client.scheduler, served_name)
    client.metrics = metrics
    chat, completion = OpenAIServingChat(client, served_names), OpenAIServingCompletion(client, served_names)
    responses = OpenAIServingResponses(client, served_names)
    if origins != frozenset():  # CORS answers (headers, preflight) only for origins the operator named
        app.add_middleware(CORSMiddleware, allow_origins=browser_origins(config.cors_origins),
                           allow_methods=["GET", "POST"], allow_headers=["*"], max_age=600)
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
        if path in ENDPOINTS and request.method == "POST":
            endpoint = ENDPOINTS[path]
            metrics.count_request(endpoint, response.status_code)
        if replica_name is not None:
            response.headers["x-phi-onnx-replica"] = replica_name
        return response

    @app.get("/health")
    async def health() -> JSONResponse:
        sched = client.scheduler
        if sched is None:
            return JSONResponse({"status": "error" if client.load_error else "loading", "error": client.load_error},
                                status_code=503)
        if not sched.alive:
            return JSONResponse({"status": "error", "error": sched.failure}, status_code=503)
        return JSONResponse({"status": "ok", "active": sched.active, "queued": sched.queued})

    @app.get("/metrics")
    async def metrics_page() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE)

    def model_card(name: str) -> dict[str, Any]:
        card = {"id": name, "object": "model", "created": created, "owned_by": "phi-onnx"}
        if client.model is not None and name in client.model.adapters and name != served_name():
            card.update(parent=served_name(), root=served_name())  # a LoRA adapter on the base (vLLM's shape)
        return card

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        client.engine()
        return {"object": "list", "data": [model_card(name) for name in served_names()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        client.engine()
        if name not in served_names():
            listed = "', '".join(served_names())
            raise ApiError(404, f"The model '{shown(name)}' does not exist; this server serves '{listed}'.",
                           param="model", code="model_not_found")
        return model_card(name)

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

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body: ChatRequest = parse(ChatRequest, await body_of(request))
        return await chat.create(request, body)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body: CompletionRequest = parse(CompletionRequest, await body_of(request))
        return await completion.create(request, body)

    @app.post("/v1/responses")
    async def create_response(request: Request) -> Response:
        body: ResponsesRequest = parse_responses(await body_of(request))
        return await responses.create(request, body)

    return app


def _check_content_type(value: str | None) -> None:
    """415 unless the body is declared JSON: a page on another site cannot send that without a CORS preflight."""
    media, *params = (value or "").split(";")
    charset = next((v.strip().strip('"').lower() for k, _, v in (p.partition("=") for p in params)
                    if k.strip().lower() == "charset"), "utf-8")
    if media.strip().lower() != "application/json" or charset not in ("utf-8", "utf8"):
        shown = f"'{value[:100]}'" if value else "none"
        raise ApiError(415, f"The request body must be JSON sent as 'Content-Type: application/json' (UTF-8); the "
                       f"Content-Type was {shown}.", code="unsupported_media_type")
