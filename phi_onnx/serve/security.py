"""Who may talk to the server: the Host allow-list (DNS rebinding) and the Origin check (cross-site requests).

A web page the user opens can make the browser send requests to the local server. Two ways, both closed here:

- DNS rebinding: the page's own name (evil.example) is made to resolve to 127.0.0.1, so its requests are
  same-origin for the browser and it can read the answers; they still carry `Host: evil.example`. Only
  the names the server is reached by are served: the loopback names, the address the connection came in
  on, and `allowed_hosts`.
- Cross-site requests: a page may POST (a "simple request", e.g. text/plain) to any origin without a
  CORS preflight. A browser names the page's origin in `Origin`; a request whose Origin is neither the
  server's own nor one of `cors_origins` is refused before it reaches the app. (The app also takes only
  `application/json` bodies, which a page cannot send cross-site without a preflight.)

Refusals are 403 with OpenAI's error shape. 403 rather than 421 (Misdirected Request) for a foreign Host:
the request did reach this server, which refuses to answer for that name — the same policy refusal as a
foreign Origin; 421 invites a client to retry on another connection, which cannot help.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, MutableMapping
from typing import Any
from urllib.parse import urlsplit

from phi_onnx.errors import OptionsError
from phi_onnx.serve.schema import ApiError

#: Served without being listed: the loopback names (the address a connection came in on is added per request).
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
#: Largest request line and headers together (431 beyond). h11 stops incomplete ones at 16 KiB, but takes any
#: size that arrives in one read.
MAX_HEADER_BYTES = 16 * 1024
_DEFAULT_PORTS = {"http": 80, "https": 443}


def split_host(value: str) -> tuple[str, int | None] | None:
    """A Host header (or allow-list entry) as (name, port): lower case, no trailing dot, IPv6 without brackets.

    None when it is not a host name or address with an optional port.
    """
    value = value.strip().lower()
    if value.startswith("["):  # [v6] or [v6]:port
        end = value.find("]")
        name, rest = value[1:end], value[end + 1:]
        if end < 0 or (rest and not rest.startswith(":")):
            return None
        port_text = rest[1:] if rest else None
        try:
            ipaddress.IPv6Address(name)
        except ValueError:
            return None
    else:
        name, _, port_text = value.partition(":") if value.count(":") == 1 else (value, "", "")
        port_text = port_text or None
        if value.count(":") > 1:  # a bare IPv6 address (allow-list entries may be written so)
            try:
                ipaddress.IPv6Address(value)
            except ValueError:
                return None
        elif not name or not all(c.isalnum() or c in "-._" for c in name) or not name.isascii():
            return None
    if port_text is not None and not (port_text.isascii() and port_text.isdigit() and len(port_text) <= 5 and
                                      0 < int(port_text) < 65536):
        return None
    name = name.rstrip(".")
    return (name, int(port_text) if port_text is not None else None) if name else None


def split_origin(value: str) -> tuple[str, str, int] | None:
    """An Origin ('https://app.example:8443') as (scheme, name, port); None for 'null' or anything else."""
    try:
        parts = urlsplit(value.strip())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname or parts.path not in ("", "/") or \
            parts.query or parts.fragment or parts.username is not None:
        return None
    return parts.scheme, parts.hostname.rstrip("."), port or _DEFAULT_PORTS[parts.scheme]


def _key(origin: tuple[str, str, int]) -> str:
    return f"{origin[0]}://{origin[1]}:{origin[2]}"


def allowed_host_set(extra: Iterable[str] | None) -> frozenset[tuple[str, int | None]] | None:
    """The loopback names plus `extra` ("name" or "name:port"); None when `extra` holds "*" (any Host)."""
    entries: set[tuple[str, int | None]] = {(name, None) for name in LOOPBACK_HOSTS}
    for raw in extra or ():
        if raw.strip() == "*":
            return None
        entry = split_host(raw)
        if entry is None:
            raise OptionsError(f"{raw!r} is not a host name or address for the Host allow-list.",
                               hint="Give names as they appear in URLs: example.lan, 192.168.1.4, [fe80::1], "
                                    "optionally with :PORT; '*' allows any Host.")
        entries.add(entry)
    return frozenset(entries)


def cors_origin_set(origins: Iterable[str] | None) -> frozenset[str] | None:
    """`origins` normalised to 'scheme://name:port' for comparison; None when they hold "*" (any origin)."""
    result: set[str] = set()
    for raw in origins or ():
        if raw.strip() == "*":
            return None
        parsed = split_origin(raw)
        if parsed is None:
            raise OptionsError(f"{raw!r} is not a web origin.",
                               hint="An origin is scheme://host[:port], e.g. https://app.example or "
                                    "http://localhost:3000 (no path); '*' allows any origin.")
        result.add(_key(parsed))
    return frozenset(result)


def browser_origins(origins: Iterable[str] | None) -> list[str]:
    """`origins` as browsers send them (lower case, default ports left out), for CORS response headers."""
    result = []
    for raw in origins or ():
        if raw.strip() == "*":
            return ["*"]
        scheme, name, port = split_origin(raw) or ("", "", 0)
        host = f"[{name}]" if ":" in name else name
        result.append(f"{scheme}://{host}" + ("" if port == _DEFAULT_PORTS[scheme] else f":{port}"))
    return result


class HostOriginGate:
    """ASGI middleware: 403 for a Host not allowed or an Origin that is neither this server's nor a CORS one."""

    def __init__(self, app: Any, *, allowed_hosts: frozenset[tuple[str, int | None]] | None,
                 cors_origins: frozenset[str] | None) -> None:
        self.app = app
        self.allowed_hosts = allowed_hosts
        self.cors_origins = cors_origins

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            refusal = self.refusal(scope)
            if refusal is not None:
                if scope["type"] == "http":
                    await _send_error(send, refusal)
                else:
                    await send({"type": "websocket.close", "code": 1008})
                return
        await self.app(scope, receive, send)

    def refusal(self, scope: MutableMapping[str, Any]) -> ApiError | None:
        """Why the request is refused, or None."""
        size = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"") + \
            sum(len(name) + len(value) + 4 for name, value in scope.get("headers", ()))
        if size > MAX_HEADER_BYTES:
            return ApiError(431, f"The request's headers are over {MAX_HEADER_BYTES // 1024} KiB.",
                            code="headers_too_large")
        headers: dict[bytes, bytes] = {}
        for name, value in scope.get("headers", ()):
            if name in (b"host", b"origin"):
                if name in headers:
                    return ApiError(400, f"The request has two {name.decode().title()} headers.",
                                    code="invalid_request")
                headers[name] = value
        raw_host = headers.get(b"host", b"").decode("latin-1")
        host = split_host(raw_host) if raw_host else None
        if raw_host and not self._host_allowed(host, scope):
            fix = f" If you reach it by this name, start it with --allowed-hosts {host[0]} (create_app(" \
                "allowed_hosts=[...]))." if host is not None else ""
            return ApiError(403, f"This server does not answer for the host {raw_host[:100]!r} (the Host header): it "
                            "answers for its loopback names, its address and the allowed hosts only, so that a page "
                            f"on another site cannot reach it through DNS rebinding.{fix}", code="host_not_allowed")
        raw_origin = headers.get(b"origin")
        if raw_origin is not None:
            origin = raw_origin.decode("latin-1")
            if not self._origin_allowed(origin, host, scope):
                return ApiError(403, f"Requests from the web origin {origin[:100]!r} are refused: a page there "
                                "could drive this server from a visitor's browser. To let that origin use the "
                                "API, start the server with --cors-origins ORIGIN (create_app(cors_origins=[...])).",
                                code="origin_not_allowed")
        return None

    def _host_allowed(self, host: tuple[str, int | None] | None, scope: MutableMapping[str, Any]) -> bool:
        if self.allowed_hosts is None:
            return True
        if host is None:
            return False
        if (host[0], None) in self.allowed_hosts or host in self.allowed_hosts:
            return True
        server = scope.get("server")  # the local address this connection came in on: the server's own
        return bool(server) and host[0] == str(server[0]).lower()

    def _origin_allowed(self, origin: str, host: tuple[str, int | None] | None,
                        scope: MutableMapping[str, Any]) -> bool:
        parsed = split_origin(origin)
        if self.cors_origins is None:
            return True
        if parsed is None:  # "null" (sandboxed frames, file: pages) or garbage: never this server's origin
            return False
        if _key(parsed) in self.cors_origins:
            return True
        # Same origin: the page was served by this server under the name the request is addressed to. With no
        # port in Host, the scheme's default port is meant (http behind a TLS proxy: Origin says https).
        return host is not None and parsed[1] == host[0] and (host[1] is None or host[1] == parsed[2])


async def _send_error(send: Any, error: ApiError) -> None:
    body = error.encoded()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if error.status == 431:  # a client sending such headers is broken or hostile: no next request on this connection
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
