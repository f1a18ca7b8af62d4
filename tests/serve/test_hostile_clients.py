"""Clients that trickle, hold connections, half-close, send megabytes, or are still streaming at shutdown.

Each over a real loopback socket against the server `phi-onnx serve` runs (phi_onnx.serve.server).
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from serve_helpers import LiveServer

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from phi_onnx.serve import create_app  # noqa: E402
from phi_onnx.serve.server import Limits  # noqa: E402


def request_bytes(server: LiveServer, path: str, body: dict[str, Any] | None = None) -> bytes:
    data = json.dumps(body).encode() if body is not None else b""
    head = f"{'POST' if body is not None else 'GET'} {path} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
    if body is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
    return (head + "\r\n").encode() + data


def read_until_closed(sock: socket.socket, seconds: float) -> bytes:
    sock.settimeout(seconds)
    data = b""
    while True:
        piece = sock.recv(65536)
        if not piece:
            return data
        data += piece


def final_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """The last response in `raw` (interim 1xx ones skipped), with a Content-Length or chunked body."""
    statuses = [int(s) for s in re.findall(rb"^HTTP/1\.1 (\d{3})", raw, re.M)]
    assert statuses, f"no HTTP response, only {raw[:200]!r}"
    while raw.startswith(b"HTTP/1.1 1"):
        raw = raw[raw.index(b"\r\n\r\n") + 4:]
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    if headers.get("transfer-encoding") == "chunked":
        decoded = b""
        while body:
            size_text, _, body = body.partition(b"\r\n")
            size = int(size_text, 16)
            if size == 0:
                break
            decoded, body = decoded + body[:size], body[size + 2:]
        body = decoded
    assert statuses[-1] == int(lines[0].split()[1])
    return statuses[-1], headers, body


def metric_at(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+]+)$", text, re.M))


def metric(server: LiveServer, name: str) -> float:
    return metric_at(server.url, name)


def wait_for(check: Any, seconds: float = 15) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(scope="module")
def guarded(tiny_model: Any) -> Iterator[LiveServer]:
    """Short deadlines (1 s for headers, 1.5 s for bodies), one slot of 4096 tokens, at most 6 connections."""
    app = create_app(tiny_model, max_batch=1, max_queue=2, capacity=4096, body_timeout=1.5)
    with LiveServer(app, limits=Limits(header_timeout=1.0, max_connections=6)) as server:
        yield server


def test_trickled_headers_are_cut_off_while_others_are_served(guarded: LiveServer) -> None:
    """Slowloris: a byte of header every 0.2 s. Disconnected (408) within the 1 s header deadline + 0.5 s."""
    slow = socket.create_connection(("127.0.0.1", guarded.port))
    started = time.monotonic()
    slow.sendall(b"POST /v1/completions HTTP/1.1\r\n")
    cut: dict[str, Any] = {}

    def trickle() -> None:
        try:
            for byte in b"Host: 127.0.0.1\r\nX-Padding: " + b"a" * 100:
                slow.sendall(bytes([byte]))
                time.sleep(0.2)
        except OSError as error:  # the server closed the connection under us
            cut["error"] = error

    trickler = threading.Thread(target=trickle, daemon=True)
    trickler.start()
    served = [httpx.get(f"{guarded.url}/health", timeout=5).status_code for _ in range(3)]  # meanwhile
    answer = read_until_closed(slow, 10)
    elapsed = time.monotonic() - started
    assert served == [200, 200, 200]
    assert 0.9 < elapsed < 2.0, elapsed  # the 1 s deadline, and a loaded machine's timer latency
    status, headers, body = final_response(answer)
    assert status == 408 and headers["content-type"] == "application/json"
    assert json.loads(body)["error"]["code"] == "request_timeout"
    slow.close()
    trickler.join(30)


def test_a_silent_connection_is_closed_at_the_header_deadline(guarded: LiveServer) -> None:
    idle = socket.create_connection(("127.0.0.1", guarded.port))
    started = time.monotonic()
    assert read_until_closed(idle, 10) == b""  # nothing was asked, so nothing is answered
    assert 0.9 < time.monotonic() - started < 2.0
    idle.close()


def test_a_trickled_body_gets_408_at_the_body_deadline(guarded: LiveServer) -> None:
    before = metric(guarded, "phi_onnx_prompt_tokens_total")
    slow = socket.create_connection(("127.0.0.1", guarded.port))
    slow.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{guarded.port}\r\nContent-Type: "
                 "application/json\r\nContent-Length: 1000\r\n\r\n{\"prompt\": \"".encode())
    started = time.monotonic()

    def trickle() -> None:
        try:
            for _ in range(40):
                slow.sendall(b"a")
                time.sleep(0.1)
        except OSError:
            pass

    threading.Thread(target=trickle, daemon=True).start()
    status, headers, body = final_response(read_until_closed(slow, 10))
    assert 1.4 < time.monotonic() - started < 3.0
    assert status == 408 and headers.get("connection") == "close"
    error = json.loads(body)["error"]
    assert error["code"] == "request_timeout" and "1.5 seconds" in error["message"]
    slow.close()
    assert metric(guarded, "phi_onnx_prompt_tokens_total") == before


def test_connections_beyond_the_limit_get_503_and_later_ones_are_served(guarded: LiveServer) -> None:
    holders = [socket.create_connection(("127.0.0.1", guarded.port)) for _ in range(6)]
    try:
        time.sleep(0.2)  # accepted
        with httpx.Client(timeout=5) as client:
            over = client.get(f"{guarded.url}/health")
        assert over.status_code == 503 and over.headers["retry-after"] == "1"
        assert over.json()["error"]["code"] == "too_many_connections"
    finally:
        for holder in holders:
            holder.close()
    assert wait_for(lambda: httpx.get(f"{guarded.url}/health", timeout=5).status_code == 200, 5)


def test_a_half_closed_client_still_gets_its_answer(guarded: LiveServer) -> None:
    """shutdown(SHUT_WR) after the request: not a disconnect. The answer comes (after an interim 100)."""
    for body in ({"prompt": "def", "max_tokens": 12, "ignore_eos": True},
                 {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 12, "ignore_eos": True}):
        path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
        client = socket.create_connection(("127.0.0.1", guarded.port))
        client.sendall(request_bytes(guarded, path, body))
        client.shutdown(socket.SHUT_WR)
        status, headers, payload = final_response(read_until_closed(client, 60))
        client.close()
        assert status == 200 and headers["content-type"] == "application/json"
        assert json.loads(payload)["usage"]["completion_tokens"] == 12
    streaming = socket.create_connection(("127.0.0.1", guarded.port))
    streaming.sendall(request_bytes(guarded, "/v1/completions", {"prompt": "def", "max_tokens": 12, "stream": True,
                                                                "ignore_eos": True}))
    streaming.shutdown(socket.SHUT_WR)
    status, _, events = final_response(read_until_closed(streaming, 60))
    streaming.close()
    assert status == 200 and events.rstrip().endswith(b"data: [DONE]")
    assert events.count(b"data: {") == 12 + 1  # 12 tokens (the tiny tokenizer: one piece each) + the finish


def test_a_client_that_closes_after_its_request_still_cancels_it(guarded: LiveServer) -> None:
    """close() sends the same FIN as a half-close: the 100 probe draws a reset, and the job is cancelled."""
    generated = metric(guarded, "phi_onnx_generated_tokens_total")
    client = socket.create_connection(("127.0.0.1", guarded.port))
    client.sendall(request_bytes(guarded, "/v1/completions", {"prompt": "x", "max_tokens": 4000, "ignore_eos": True}))
    assert wait_for(lambda: metric(guarded, "phi_onnx_active_requests") == 1)
    client.close()
    closed = time.monotonic()
    assert wait_for(lambda: metric(guarded, "phi_onnx_active_requests") == 0, 10)
    assert time.monotonic() - closed < 3
    assert metric(guarded, "phi_onnx_generated_tokens_total") - generated < 1000  # nowhere near its 4000
    assert httpx.post(f"{guarded.url}/v1/completions", json={"prompt": "x", "max_tokens": 2},
                      timeout=30).status_code == 200


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


def test_megabyte_prompts_are_refused_before_tokenizing_and_rss_stays_flat(guarded: LiveServer) -> None:
    """The issue's case: ~3.9 MB messages, each tokenized in full before the context check, left ~400 MB each
    (0.39 -> 2.2 GiB after 10). Now the character bound refuses them unread by the tokenizer."""
    text = ("lorem ipsum dolor sit amet " * 140_000).strip()  # 3.78 MB, under the 4 MiB body limit
    bodies = [("/v1/chat/completions", {"messages": [{"role": "user", "content": text}], "max_tokens": 8}),
              ("/v1/completions", {"prompt": text, "max_tokens": 8}),
              ("/v1/completions", {"prompt": [text], "max_tokens": 8})]
    with httpx.Client(timeout=60) as client:
        def ask(path: str, body: dict[str, Any]) -> float:
            started = time.monotonic()
            answer = client.post(guarded.url + path, json=body)
            assert answer.status_code == 400, answer.text
            error = answer.json()["error"]
            assert error["code"] == "context_length_exceeded" and "4096 tokens" in error["message"]
            assert f"{len(text)} characters" in error["message"]
            return time.monotonic() - started

        for path, body in bodies:  # warm up: allocator arenas, connection
            ask(path, body)
        start = rss_mib()
        times = [ask(*bodies[i % 3]) for i in range(12)]
        grown = rss_mib() - start
    print(f"RSS after 12 requests of 3.8 MB: +{grown:.1f} MiB (from {start:.0f} MiB); slowest {max(times):.2f} s")
    assert grown < 64, grown  # MiB: the bound (a tokenized 3.8 MB prompt held ~400 MB each)
    assert max(times) < 5  # no tokenizing: the JSON decode and a length check


SERVE_ENV_TIMEOUT = 120


def start_server(export: Path, *flags: str) -> tuple[subprocess.Popen[str], str, list[str]]:
    server = subprocess.Popen([sys.executable, "-m", "phi_onnx", "serve", str(export), "--port", "0", *flags],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(server.stderr.readline, "")), daemon=True).start()
    deadline = time.monotonic() + SERVE_ENV_TIMEOUT
    url = None
    while url is None:
        assert time.monotonic() < deadline and server.poll() is None, "".join(lines)
        found = [m for line in list(lines) if (m := re.search(r"running on (http://127\.0\.0\.1:\d+)", line))]
        url = found[0].group(1) if found else None
        time.sleep(0.1)
    while httpx.get(f"{url}/health", timeout=5).status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    return server, url, lines


def test_streams_running_past_the_grace_end_with_an_error_event_and_done(tiny_export: Path) -> None:
    """SIGTERM with --grace 1: a 4000-token stream and a non-streaming request are still running at the end."""
    server, url, lines = start_server(tiny_export, "--max-batch", "2", "--max-context", "4096", "--grace", "1")
    try:
        whole: dict[str, Any] = {}

        def non_streaming() -> None:
            answer = httpx.post(f"{url}/v1/completions", timeout=60,
                                json={"prompt": "x", "max_tokens": 4000, "ignore_eos": True})
            whole.update(status=answer.status_code, body=answer.json())

        other = threading.Thread(target=non_streaming)
        chunks: list[str] = []
        with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=60,
                          json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4000,
                                "ignore_eos": True, "stream": True}) as stream:
            for line in stream.iter_lines():  # an IncompleteRead (a cut stream) raises here
                if not line:
                    continue
                chunks.append(line)
                if len(chunks) == 5:
                    other.start()
                    assert wait_for(lambda: metric_at(url, "phi_onnx_active_requests") == 2)
                    signalled = time.monotonic()
                    server.send_signal(signal.SIGTERM)
        ended = time.monotonic() - signalled
        other.join(30)
        assert server.wait(30) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(10)
    log = "".join(lines)
    assert chunks[-1] == "data: [DONE]"
    error = json.loads(chunks[-2].removeprefix("data: "))["error"]
    assert error["code"] == "shutting_down" and error["type"] == "server_error" and "--grace" in error["message"]
    assert all("choices" in json.loads(c.removeprefix("data: ")) for c in chunks[:-2])  # whole chunks before it
    assert 0.9 < ended < 4, ended  # at the grace's end, not uvicorn's later deadline
    assert whole["status"] == 503 and whole["body"]["error"]["code"] == "shutting_down"
    assert "Traceback" not in log and "CancelledError" not in log and "Cancel " not in log, log


def test_cli_limit_flags_reach_the_server(monkeypatch: Any, tiny_export: Path) -> None:
    import uvicorn
    from click.testing import CliRunner

    from phi_onnx.cli import main

    started: list[Any] = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, *a, **k: started.append(self))
    result = CliRunner().invoke(main, ["serve", str(tiny_export), "--port", "0", "--header-timeout", "3",
                                       "--max-connections", "7", "--grace", "2"])
    assert result.exit_code == 0, result.output
    config = started[0].config
    assert config.http.limits == Limits(header_timeout=3.0, max_connections=7)
    assert config.timeout_graceful_shutdown == 7.0 and started[0].grace == 2.0  # grace + the drain margin
    for flag, value in (("--header-timeout", "0"), ("--max-connections", "0"), ("--body-timeout", "-1"),
                        ("--header-timeout", "nan"), ("--body-timeout", "inf"), ("--grace", "nan")):
        bad = CliRunner().invoke(main, ["serve", str(tiny_export), flag, value])
        assert bad.exit_code == 2 and flag in bad.output and "Traceback" not in bad.output


def test_limits_out_of_range_are_refused_by_the_library(tiny_model: Any) -> None:
    from phi_onnx.errors import OptionsError

    for bad in ({"header_timeout": float("nan")}, {"keep_alive": 0}, {"max_connections": 0}):
        with pytest.raises(OptionsError, match=next(iter(bad))):
            Limits(**bad)
    for timeout in (float("nan"), float("inf"), 0, "5"):
        with pytest.raises(OptionsError, match="body_timeout"):
            create_app(tiny_model, body_timeout=timeout)


def test_oversized_headers_get_a_json_error(guarded: LiveServer) -> None:
    """Headers over 16 KiB: 431 when they come at once, 400 from h11 when they trickle; JSON, not uvicorn's text."""
    head = f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{guarded.port}\r\nX-Big: {'a' * 20_000}\r\n\r\n".encode()
    for pieces, status, code in (([head], 431, "headers_too_large"),
                                 ([head[:17_000], head[17_000:]], 400, "invalid_request")):
        client = socket.create_connection(("127.0.0.1", guarded.port))
        for piece in pieces:
            client.sendall(piece)
            time.sleep(0.2)
        got, headers, body = final_response(read_until_closed(client, 10))
        client.close()
        assert got == status and headers["content-type"] == "application/json"
        assert json.loads(body)["error"]["code"] == code
    assert httpx.get(f"{guarded.url}/health", timeout=5).status_code == 200
