"""What a web page may make the local server do: Host allow-list (DNS rebinding), Origin and Content-Type (CSRF),
CORS only for named origins, API keys a client can send. Over a real loopback socket, as a browser would reach it."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
from click.testing import CliRunner
from serve_helpers import LiveServer

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from phi_onnx.cli import main  # noqa: E402
from phi_onnx.errors import OptionsError  # noqa: E402
from phi_onnx.serve import create_app  # noqa: E402
from phi_onnx.serve.security import split_host, split_origin  # noqa: E402

COMPLETION = {"prompt": "def", "max_tokens": 3, "ignore_eos": True}


@pytest.fixture(scope="module")
def open_server(tiny_model: Any) -> Iterator[LiveServer]:
    """The default server: loopback, no API key, no CORS origins."""
    with LiveServer(create_app(tiny_model, max_batch=2, capacity=256)) as server:
        yield server


def counters(server: LiveServer) -> tuple[float, float]:
    """(prompt tokens processed, tokens generated) so far: both stay put when a request is refused."""
    text = httpx.get(f"{server.url}/metrics", timeout=10).text

    def total(name: str) -> float:
        return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+]+)$", text, re.M))

    return total("phi_onnx_prompt_tokens_total"), total("phi_onnx_generated_tokens_total")


def assert_refused(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code
    assert "access-control-allow-origin" not in response.headers
    return error


def test_dns_rebinding_a_foreign_host_is_refused(open_server: LiveServer) -> None:
    """A page at evil.example whose name was rebound to 127.0.0.1 sends Host: evil.example: no answer to read."""
    before = counters(open_server)
    for host in ("evil.example", f"evil.example:{open_server.port}", "127.0.0.1.evil.example", "0.0.0.0",
                 "localhost.evil.example:80"):
        models = httpx.get(f"{open_server.url}/v1/models", headers={"Host": host}, timeout=10)
        error = assert_refused(models, 403, "host_not_allowed")
        assert repr(host) in error["message"] and "DNS rebinding" in error["message"]
        assert "--allowed-hosts" in error["message"]
        assert "tiny" not in models.text and "phi-onnx" not in models.text.replace("phi-onnx does", "")
        generated = httpx.post(f"{open_server.url}/v1/completions", json=COMPLETION, headers={"Host": host},
                               timeout=10)
        assert_refused(generated, 403, "host_not_allowed")
        for path in ("/", "/health", "/metrics"):  # the page, and what it would read from the others
            assert_refused(httpx.get(open_server.url + path, headers={"Host": host}, timeout=10), 403,
                           "host_not_allowed")
    assert counters(open_server) == before  # nothing was generated


def test_loopback_names_and_the_bound_address_are_served(open_server: LiveServer) -> None:
    port = open_server.port
    for host in ("127.0.0.1", f"127.0.0.1:{port}", "localhost", f"LOCALHOST:{port}", f"localhost.:{port}",
                 "[::1]", f"[::1]:{port}"):
        assert httpx.get(f"{open_server.url}/v1/models", headers={"Host": host}, timeout=10).status_code == 200


def test_allowed_hosts_extend_the_list_and_star_turns_it_off(tiny_model: Any) -> None:
    app = create_app(tiny_model, max_batch=1, capacity=64, allowed_hosts=["box.lan", "other.lan:9000"])
    with LiveServer(app) as server:
        def status(host: str) -> int:
            return httpx.get(f"{server.url}/health", headers={"Host": host}, timeout=10).status_code

        assert status(f"box.lan:{server.port}") == 200 and status("BOX.LAN") == 200
        assert status("other.lan:9000") == 200 and status("other.lan:9001") == 403  # a port, when given, counts
        assert status("evil.example") == 403 and status(f"localhost:{server.port}") == 200
    with LiveServer(create_app(tiny_model, max_batch=1, capacity=64, allowed_hosts=["*"])) as server:
        assert httpx.get(f"{server.url}/health", headers={"Host": "anything.example"}, timeout=10).status_code == 200


def test_csrf_a_cross_site_simple_request_runs_nothing(open_server: LiveServer) -> None:
    """A page elsewhere POSTs text/plain (no CORS preflight): refused by its Origin, and no generation runs."""
    before = counters(open_server)
    body = json.dumps(COMPLETION).encode()
    for path in ("/v1/completions", "/v1/chat/completions"):
        for origin in ("http://evil.example", "https://evil.example", "null", "garbage",
                       f"http://localhost:{open_server.port + 1}", f"https://127.0.0.1:{open_server.port}.evil.example"):
            for kind in ("text/plain", "application/json", "application/x-www-form-urlencoded"):
                answer = httpx.post(open_server.url + path, content=body, timeout=10,
                                    headers={"Content-Type": kind, "Origin": origin})
                error = assert_refused(answer, 403, "origin_not_allowed")
                assert repr(origin) in error["message"] and "--cors-origins" in error["message"]
        # A foreign origin's preflight is refused too, so a browser never sends the request that would follow.
        preflight = httpx.options(open_server.url + path, timeout=10, headers={
            "Origin": "http://evil.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type"})
        assert_refused(preflight, 403, "origin_not_allowed")
    assert counters(open_server) == before


def test_only_json_bodies_are_read(open_server: LiveServer) -> None:
    """Without Origin (curl, SDKs) or from the server's own page, a body that is not declared JSON is a 415."""
    before = counters(open_server)
    body = json.dumps(COMPLETION).encode()
    for headers in ({}, {"Content-Type": "text/plain"}, {"Content-Type": "application/x-www-form-urlencoded"},
                    {"Content-Type": "multipart/form-data; boundary=x"}, {"Content-Type": "application/jsonx"},
                    {"Content-Type": "application/json; charset=latin-1"},
                    {"Content-Type": "text/plain", "Origin": open_server.url}):
        answer = httpx.post(f"{open_server.url}/v1/completions", content=body, headers=headers, timeout=10)
        error = assert_refused(answer, 415, "unsupported_media_type")
        assert "Content-Type: application/json" in error["message"]
    assert counters(open_server) == before
    for kind in ("application/json", "application/json; charset=utf-8", "Application/JSON;charset=\"UTF-8\""):
        answer = httpx.post(f"{open_server.url}/v1/completions", content=body, headers={"Content-Type": kind},
                            timeout=30)
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 3


def test_the_chat_page_and_its_same_origin_requests_still_work(open_server: LiveServer) -> None:
    """The page at / fetches /v1/chat/completions same-origin: the browser sends Origin = the server's own."""
    port = open_server.port
    for host, origin in ((f"127.0.0.1:{port}", f"http://127.0.0.1:{port}"),
                         (f"localhost:{port}", f"http://localhost:{port}"),
                         (f"[::1]:{port}", f"http://[::1]:{port}"),
                         ("localhost", "https://localhost")):  # behind a TLS proxy that keeps the Host
        page = httpx.get(f"{open_server.url}/", headers={"Host": host}, timeout=10)
        assert page.status_code == 200 and "<html" in page.text.lower()
        with httpx.stream("POST", f"{open_server.url}/v1/chat/completions", timeout=30,
                          headers={"Host": host, "Origin": origin},
                          json={"messages": [{"role": "user", "content": "hi"}], "stream": True,
                                "max_tokens": 3}) as stream:
            assert stream.status_code == 200
            lines = [line for line in stream.iter_lines() if line]
        assert lines[-1] == "data: [DONE]"
    # The same page under another port is another origin.
    other = httpx.post(f"{open_server.url}/v1/completions", json=COMPLETION, timeout=10,
                       headers={"Host": f"127.0.0.1:{port}", "Origin": f"http://127.0.0.1:{port + 1}"})
    assert_refused(other, 403, "origin_not_allowed")


def test_cors_origins_get_cors_answers_and_no_one_else(tiny_model: Any) -> None:
    app = create_app(tiny_model, max_batch=1, capacity=64, cors_origins=["http://app.example:3000",
                                                                        "HTTPS://Tools.Example"])
    with LiveServer(app) as server:
        for origin in ("http://app.example:3000", "https://tools.example"):
            preflight = httpx.options(f"{server.url}/v1/chat/completions", timeout=10, headers={
                "Origin": origin, "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os"})
            assert preflight.status_code == 200
            assert preflight.headers["access-control-allow-origin"] == origin
            assert "POST" in preflight.headers["access-control-allow-methods"]
            answer = httpx.post(f"{server.url}/v1/completions", json=COMPLETION, headers={"Origin": origin},
                                timeout=30)
            assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == origin
            plain = httpx.post(f"{server.url}/v1/completions", content=json.dumps(COMPLETION), timeout=10,
                               headers={"Origin": origin, "Content-Type": "text/plain"})
            assert plain.status_code == 415  # still JSON only
        refused = httpx.post(f"{server.url}/v1/completions", json=COMPLETION, timeout=10,
                             headers={"Origin": "http://app.example:3001"})
        assert_refused(refused, 403, "origin_not_allowed")
    with LiveServer(create_app(tiny_model, max_batch=1, capacity=64, cors_origins=["*"])) as server:
        anyone = httpx.get(f"{server.url}/v1/models", headers={"Origin": "http://anyone.example"}, timeout=10)
        assert anyone.status_code == 200 and anyone.headers["access-control-allow-origin"] == "*"


def test_without_cors_origins_no_cors_headers_are_sent(open_server: LiveServer) -> None:
    own = httpx.get(f"{open_server.url}/v1/models", headers={"Origin": open_server.url}, timeout=10)
    assert own.status_code == 200 and "access-control-allow-origin" not in own.headers
    options = httpx.options(f"{open_server.url}/v1/models", headers={"Origin": open_server.url}, timeout=10)
    assert options.status_code == 405 and "error" in options.json()


@pytest.mark.parametrize("entry", ["exa mple.com", "http://x.example", "[::1", "x:99999", "münchen.example"])
def test_bad_allowed_hosts_are_refused_at_start(tiny_model: Any, entry: str) -> None:
    with pytest.raises(OptionsError, match="not a host name"):
        create_app(tiny_model, allowed_hosts=[entry])


@pytest.mark.parametrize("entry", ["app.example", "http://x.example/path", "ftp://x.example", "null"])
def test_bad_cors_origins_are_refused_at_start(tiny_model: Any, entry: str) -> None:
    with pytest.raises(OptionsError, match="not a web origin"):
        create_app(tiny_model, cors_origins=[entry])


@pytest.mark.parametrize("key", ["clé-secrète", "key with spaces", "tab\tkey", "ключ", "emoji-🔑"])
def test_an_api_key_no_client_can_send_is_refused_at_start(tiny_model: Any, tiny_export: Any, key: str) -> None:
    with pytest.raises(OptionsError, match="HTTP header cannot carry"):
        create_app(tiny_model, api_key=key)
    result = CliRunner().invoke(main, ["serve", str(tiny_export), "--api-key", key, "--port", "0"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "HTTP header cannot carry" in result.output and "visible ASCII" in result.output
    env = CliRunner().invoke(main, ["serve", str(tiny_export), "--port", "0"], env={"PHI_ONNX_API_KEY": key})
    assert env.exit_code == 2 and "HTTP header cannot carry" in env.output


def test_cli_host_and_origin_flags(monkeypatch: Any, tiny_export: Any) -> None:
    """--allowed-hosts and --cors-origins take repeats and comma lists, add --host, and refuse bad entries (exit 2)."""
    import phi_onnx.serve

    seen: dict[str, Any] = {}

    def fake_create_app(load: Any, config: Any = None, **options: Any) -> Any:
        seen.update(config.app_options() if config is not None else {}, **options)
        raise SystemExit(0)  # stop before uvicorn starts

    monkeypatch.setattr(phi_onnx.serve, "create_app", fake_create_app)
    result = CliRunner().invoke(main, ["serve", str(tiny_export), "--port", "0", "--host", "localhost",
                                       "--allowed-hosts", "a.lan,b.lan:8000", "--allowed-hosts", " c.lan ",
                                       "--cors-origins", "https://app.example,http://localhost:3000",
                                       "--body-timeout", "5"])
    assert result.exit_code == 0, result.output
    assert list(seen["allowed_hosts"]) == ["a.lan", "b.lan:8000", "c.lan", "localhost"]
    assert list(seen["cors_origins"]) == ["https://app.example", "http://localhost:3000"]
    assert seen["body_timeout"] == 5
    for flags, message in ((["--allowed-hosts", "a b"], "not a host name"),
                           (["--cors-origins", "app.example"], "not a web origin")):
        bad = CliRunner().invoke(main, ["serve", str(tiny_export), "--port", "0", *flags])
        assert bad.exit_code == 2 and message in bad.output and "Traceback" not in bad.output


def test_host_and_origin_parsing() -> None:
    assert split_host("LocalHost.:8000") == ("localhost", 8000) and split_host("[::1]:80") == ("::1", 80)
    assert split_host("::1") == ("::1", None) and split_host("1.2.3.4") == ("1.2.3.4", None)
    for bad in ("", "a b", "[::1", "[zz]:1", "x:0", "x:65536", "x:y", "a@b", "a/b", ".", "x:٨٠", "x:" + "9" * 5000):
        assert split_host(bad) is None, bad
    assert split_origin("https://App.Example") == ("https", "app.example", 443)
    assert split_origin("http://[::1]:3000") == ("http", "::1", 3000)
    for bad in ("null", "file://", "http://a/b", "http://u@a", "ws://a", "http://a:99999"):
        assert split_origin(bad) is None, bad
