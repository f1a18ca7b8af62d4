"""An OpenAI-compatible HTTP server over continuous batching (`phi-onnx serve`; needs the serve extra).

`create_app(model, max_batch=8, ...)` returns a FastAPI app to run with uvicorn or mount in a service.
"""

from __future__ import annotations

from typing import Any

__all__ = ["create_app"]


def create_app(model: Any, **options: Any) -> Any:
    """See `phi_onnx.serve.app.create_app` (imported on first use: FastAPI is an optional dependency)."""
    from phi_onnx.serve.app import create_app as make

    return make(model, **options)
