"""Running the app with uvicorn, bounded against slow and hostile clients (what `phi-onnx serve` uses).

`server(app, host=..., port=...)` returns a uvicorn Server whose HTTP/1.1 protocol (uvicorn's h11 one,
extended) adds what uvicorn leaves open:

- A request's headers must arrive within `header_timeout` seconds of its first byte (or of the connection,
  for the first request): a client that trickles them (slowloris) gets a 408 and is disconnected. (The
  body's time is bounded by the app: `create_app(body_timeout=...)`.) Headers are at most 16 KiB (h11).
- At most `max_connections` connections are served; a request on one beyond them gets a 503 JSON error
  with Retry-After, and is closed.
- A client that half-closes (shutdown(SHUT_WR)) after its request still gets the answer. EOF alone
  cannot tell that from a client that went away (both send FIN), so the server then sends an interim
  `100 Continue`: a client that closed its socket answers it with a reset, which the server sees and
  treats as a disconnect (the app cancels the job), as before.
- Malformed requests get a 400 in OpenAI's error shape instead of uvicorn's plain text.
- On Ctrl-C / SIGTERM the app is told first (`drain(grace)`): streams still running when the grace ends
  finish with an error event and `data: [DONE]` instead of being cut; uvicorn's own deadline comes
  `DRAIN_MARGIN` seconds later, so it never has to cancel them.
"""

from __future__ import annotations

import asyncio
import logging
import math
import socket
from dataclasses import dataclass
from typing import Any, ClassVar

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from phi_onnx.errors import OptionsError
from phi_onnx.serve.config import DEFAULTS
from phi_onnx.serve.schema import ApiError

#: Seconds between the grace's end (streams told to stop) and uvicorn's deadline (tasks cancelled).
DRAIN_MARGIN = 5.0
#: How often a half-closed connection is checked for a reset (the peer closed rather than half-closed).
_PROBE_INTERVAL = 0.25


@dataclass(frozen=True)
class Limits:
    """What the HTTP layer allows a client (see the module docstring)."""

    header_timeout: float = DEFAULTS.header_timeout
    max_connections: int = DEFAULTS.max_connections
    keep_alive: float = 5.0

    def __post_init__(self) -> None:
        for name in ("header_timeout", "keep_alive"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise OptionsError(f"Limits.{name} must be a positive number of seconds, not {value!r}.")
        if not (isinstance(self.max_connections, int) and self.max_connections >= 1):
            raise OptionsError(f"Limits.max_connections must be a positive integer, not {self.max_connections!r}.")


def _raw_response(status: int, reason: bytes, error: ApiError, extra: bytes = b"") -> bytes:
    body = error.encoded()
    return (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n%s\r\n"
            % (status, reason, len(body), extra)) + body


async def _overloaded(scope: Any, receive: Any, send: Any) -> None:
    """The app for connections beyond max_connections."""
    body = ApiError(503, "The server has as many connections as it serves (--max-connections); retry shortly.",
                    type="server_error", code="too_many_connections").encoded()
    await send({"type": "http.response.start", "status": 503,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"retry-after", b"1"), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class GuardedProtocol(H11Protocol):
    """uvicorn's h11 protocol with a header deadline, a connection bound, half-close support and JSON 400s."""

    limits: ClassVar[Limits] = Limits()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._probe_timer: asyncio.TimerHandle | None = None
        self._bytes_seen = False

    # -- header deadline ---------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            self.app = _overloaded  # answered when its request arrives (the client is then reading)
        self._start_header_timer()

    def _start_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.limits.header_timeout, self._headers_too_slow)

    def _stop_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def data_received(self, data: bytes) -> None:
        if self.cycle is None or self.cycle.response_complete:  # the start of a (next) request
            self._bytes_seen = True
            self._start_header_timer()
        super().data_received(data)

    def handle_events(self) -> None:
        before = self.cycle
        super().handle_events()
        if self.cycle is not before:  # a request's headers are complete
            self._stop_header_timer()
            self._bytes_seen = False

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if self._bytes_seen:  # a client that started a request hears why it is dropped
            error = ApiError(408, f"The request's headers did not arrive within {self.limits.header_timeout:g} "
                             "seconds.", code="request_timeout")
            self.transport.write(_raw_response(408, b"Request Timeout", error))
        self.transport.close()

    # -- half-close --------------------------------------------------------------------------------
    def eof_received(self) -> bool | None:  # type: ignore[override]
        cycle = self.cycle
        if cycle is None or cycle.response_complete or self.conn.their_state is not h11.DONE:
            return None  # idle, or mid-request: the client is gone (the transport closes, the app hears it)
        cycle.keep_alive = False  # nothing more can come in: close once the answer is out
        if not cycle.response_started and self.conn.their_http_version == b"1.1":
            # Writing to a socket the peer has closed draws a reset; one the peer half-closed takes it (HTTP/1.1
            # clients must accept 1xx responses before the final one).
            probe = h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue")
            self.transport.write(self.conn.send(probe))
        self._probe_timer = self.loop.call_later(_PROBE_INTERVAL, self._probe)
        return True  # keep the transport open for writing the answer

    def _probe(self) -> None:
        self._probe_timer = None
        if self.transport.is_closing() or self.cycle is None or self.cycle.response_complete:
            return
        sock = self.transport.get_extra_info("socket")
        try:
            failed = sock is not None and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0
        except OSError:
            failed = True
        if failed:  # reset: the client closed its socket, it did not just half-close
            self.transport.abort()  # connection_lost: the request is disconnected, the app cancels its job
        else:
            self._probe_timer = self.loop.call_later(_PROBE_INTERVAL, self._probe)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_timer()
        if self._probe_timer is not None:
            self._probe_timer.cancel()
            self._probe_timer = None
        super().connection_lost(exc)

    # -- malformed requests ------------------------------------------------------------------------
    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request h11 cannot parse, in OpenAI's error shape."""
        self._stop_header_timer()
        error = ApiError(400, f"Invalid HTTP request ({msg.rstrip('.')}).", code="invalid_request")
        self.transport.write(_raw_response(400, b"Bad Request", error))
        self.transport.close()


class Server(uvicorn.Server):
    """uvicorn's Server that tells the app about shutdown first, so that its streams end cleanly (module docstring)."""

    def __init__(self, config: uvicorn.Config, grace: float, url: str | None = None) -> None:
        super().__init__(config)
        self.grace, self.url = grace, url

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started and sockets and self.url:  # uvicorn says where it listens only for sockets it bound itself
            logging.getLogger("uvicorn.error").info("Uvicorn running on %s (Press CTRL+C to quit)", self.url)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        state = getattr(getattr(self.config.app, "state", None), "phi_onnx", None)
        if state is not None:
            state.drain(self.grace)
        await super().shutdown(sockets)


def server(app: Any, *, host: str = "127.0.0.1", port: int = 8000, grace: float = 10.0,
           limits: Limits | None = None, log_level: str = "info", url: str | None = None) -> Server:
    """A uvicorn Server for `app` with GuardedProtocol and `limits`; `.run()` serves until Ctrl-C / SIGTERM."""
    limits = limits or Limits()
    protocol = type("GuardedProtocol", (GuardedProtocol,), {"limits": limits})
    config = uvicorn.Config(app, host=host, port=port, http=protocol, timeout_graceful_shutdown=grace + DRAIN_MARGIN,
                            timeout_keep_alive=limits.keep_alive, log_level=log_level)
    return Server(config, grace, url)
