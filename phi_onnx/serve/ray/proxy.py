"""The middleware for Serve's HTTP proxy: the proxy's own errors in OpenAI's error shape."""

from __future__ import annotations

import json
from collections.abc import MutableMapping
from typing import Any


def openai_error(message: str, code: str) -> bytes:
    """An OpenAI-shaped server error body."""
    return json.dumps({"error": {"message": message, "type": "server_error", "param": None, "code": code}}).encode()


REPLICA_FAILED = ("The replica serving this request failed before it finished; the deployment replaces it. "
                  "Retry the request.")
DEPLOYMENT_FULL = "Every replica's batch and queue are full, and so is the proxy's queue (max_queued_requests). " \
                  "Retry later."


class ReplicaFailureErrors:
    """ASGI middleware for Serve's HTTP proxy: its own errors in the OpenAI error shape.

    When a replica dies, Serve's proxy returns without a response (uvicorn would then send a
    plain-text 500) or cuts a stream short; when its queue is full it answers a plain-text 503.
    This answers them with a JSON `server_error` (code `replica_failed`, or `queue_full` with
    Retry-After) and ends a cut event stream with an SSE error event, so OpenAI clients raise a
    clean APIError instead of a parse error or an incomplete read. The app's responses (JSON
    errors included) pass untouched.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state: dict[str, Any] = {"status": None, "replaced": False, "sse": False, "ended": False}

        async def guarded_send(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                kind = dict(message.get("headers", [])).get(b"content-type", b"")
                state["status"] = message["status"]
                state["replaced"] = message["status"] >= 500 and not kind.startswith(b"application/json")
                state["sse"] = kind.startswith(b"text/event-stream")
                if state["replaced"]:
                    return
            elif message["type"] == "http.response.body":
                if state["replaced"]:
                    return  # the plain-text body; the JSON one is sent at the end
                state["ended"] = not message.get("more_body", False)
            await send(message)

        try:
            await self.app(scope, receive, guarded_send)
        except Exception:
            if state["status"] is not None and not state["replaced"] and not state["sse"]:
                raise  # a response is under way and cannot be changed: let uvicorn close it
        if state["status"] is None or state["replaced"]:
            await _send_error(send, state["status"] or 500)
        elif state["sse"] and not state["ended"]:
            event = b"data: " + openai_error(REPLICA_FAILED, "replica_failed") + b"\n\n"
            await send({"type": "http.response.body", "body": event, "more_body": False})


async def _send_error(send: Any, status: int) -> None:
    full = status == 503
    body = openai_error(DEPLOYMENT_FULL, "queue_full") if full else openai_error(REPLICA_FAILED, "replica_failed")
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if full:
        headers.append((b"retry-after", b"1"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def proxy_middlewares() -> list[Any]:
    """Serve's HTTP proxy callback (RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH): phi-onnx's proxy middleware."""
    from starlette.middleware import Middleware

    return [Middleware(ReplicaFailureErrors)]
