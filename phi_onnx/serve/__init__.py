"""An OpenAI-compatible HTTP server over continuous batching (`phi-onnx serve`; needs the serve extra).

`create_app(model, ServeConfig(...))` (or `create_app(model, max_batch=8, ...)`) returns a FastAPI app to run
with uvicorn or mount in a service. The layers, as vLLM's entrypoints: `config` (ServeConfig, the defaults),
`schema` (the protocol: request models and errors), `engine_client` (async generation over the Scheduler's
thread), `serving_chat` / `serving_completions` (requests to engine calls, events to OpenAI objects),
`app` (routes and middleware), `server` (uvicorn with limits and graceful shutdown).
"""

from __future__ import annotations

from typing import Any

from phi_onnx.serve.config import ServeConfig

__all__ = ["ServeConfig", "create_app"]


def create_app(model: Any, config: ServeConfig | None = None, **options: Any) -> Any:
    """See `phi_onnx.serve.app.create_app` (imported on first use: FastAPI is an optional dependency)."""
    from phi_onnx.serve.app import create_app as make

    return make(model, config, **options)
