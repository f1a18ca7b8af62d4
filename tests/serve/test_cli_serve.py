"""`phi-onnx serve`: a real process on an ephemeral loopback port, graceful SIGTERM, clear errors."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from phi_onnx.cli import main
from phi_onnx.cli.serve import _loopback

httpx = pytest.importorskip("httpx")


def record_served_apps(monkeypatch: Any) -> list[Any]:
    """The apps `phi-onnx serve` hands to uvicorn, recorded instead of served."""
    import uvicorn

    served: list[Any] = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, *a, **k: served.append(self.config.app))
    return served


def wait_until_loaded(client: Any, seconds: float = 60) -> None:
    """Poll /health until 200: the model loads in the background and /health is 503 until then."""
    deadline = time.monotonic() + seconds
    while client.get("/health").status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.1)


def test_serve_process_answers_then_stops_gracefully_on_sigterm(tiny_export: Path) -> None:
    pytest.importorskip("uvicorn")
    pytest.importorskip("fastapi")
    server = subprocess.Popen([sys.executable, "-m", "phi_onnx", "serve", str(tiny_export), "--port", "0",
                               "--max-batch", "2", "--max-context", "256", "--grace", "20"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(server.stderr.readline, "")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 60
        url = None
        while url is None:
            assert time.monotonic() < deadline and server.poll() is None, "".join(lines)
            found = [m for line in list(lines) if (m := re.search(r"running on (http://127\.0\.0\.1:\d+)", line))]
            url = found[0].group(1) if found else None
            time.sleep(0.1)
        while httpx.get(f"{url}/health", timeout=5).status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert any("KV pool: 2 slots x 256 tokens" in line for line in lines)
        chunks: list[str] = []
        with httpx.stream("POST", f"{url}/v1/completions", timeout=60,
                          json={"prompt": "def", "max_tokens": 120, "ignore_eos": True, "stream": True}) as stream:
            for line in stream.iter_lines():
                if not line:
                    continue
                if not chunks:
                    server.send_signal(signal.SIGTERM)  # mid-stream: the stream still finishes
                chunks.append(line)
        assert chunks[-1] == "data: [DONE]"
        finishes = [json.loads(c[6:])["choices"][0]["finish_reason"] for c in chunks[:-1]]
        assert finishes[-1] == "length" and finishes.count(None) == len(finishes) - 1 > 10
        assert server.wait(30) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(10)


def test_serve_without_fastapi_says_what_to_install(monkeypatch: Any, tiny_export: Path) -> None:
    monkeypatch.setitem(sys.modules, "fastapi", None)  # import fastapi now raises ImportError
    result = CliRunner().invoke(main, ["serve", str(tiny_export)])
    assert result.exit_code == 2
    assert 'pip install "phi-onnx[serve]"' in result.output


def test_serve_bad_folder_is_an_error_not_a_traceback(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["serve", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "Error:" in result.output and "Traceback" not in result.output


def test_loopback_detection() -> None:
    assert _loopback("127.0.0.1") and _loopback("::1") and _loopback("localhost")
    assert not _loopback("0.0.0.0") and not _loopback("192.168.1.4") and not _loopback("example.com")


def test_serve_a_name_exports_it_into_the_store_once(monkeypatch: Any, tmp_path: Path) -> None:
    """`phi-onnx serve tiny-phi3` runs from the store like chat/generate: exported on first use, reused after."""
    monkeypatch.setenv("PHI_ONNX_HOME", str(tmp_path / "home"))
    served = record_served_apps(monkeypatch)
    for _ in range(2):
        result = CliRunner().invoke(main, ["serve", "tiny-phi3", "--port", "0"])
        assert result.exit_code == 0, result.output
    entries = [p for p in (tmp_path / "home").rglob("phi_onnx.json")]
    assert len(entries) == 1  # the second run reused the first export
    assert len(served) == 2 and str(tmp_path / "home") in result.output  # "Serving <store entry> on ..."
    from fastapi.testclient import TestClient

    with TestClient(served[-1]) as client:
        wait_until_loaded(client)
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["tiny-phi3"]


def test_serve_refuses_a_kv_pool_larger_than_the_memory_available(monkeypatch: Any, tiny_export: Path) -> None:
    import phi_onnx.runtime.kv_pool as kv_pool

    monkeypatch.setattr(kv_pool, "available_memory", lambda: 2**20)  # 1 MiB left
    result = CliRunner().invoke(main, ["serve", str(tiny_export), "--max-batch", "4", "--port", "0"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "KV cache for 4 requests" in result.output and "Lower --max-batch or --max-context." in result.output


def test_serve_shortens_default_slots_to_fit_memory_but_never_an_explicit_max_context(monkeypatch: Any,
                                                                                    tiny_export: Path) -> None:
    import phi_onnx.runtime.kv_pool as kv_pool
    import phi_onnx.serve
    from phi_onnx.runtime.folder import read_folder

    folder = read_folder(tiny_export)
    per_token = kv_pool.pool_bytes(folder, 4, 1)[1] // 4
    assert folder.default_max_length >= 1024  # else there is nothing to shorten
    # Beside the weights (they load first), half fits 600 tokens per slot.
    monkeypatch.setattr(kv_pool, "available_memory", lambda: folder.weight_bytes + 2 * per_token * 4 * 600)
    seen: dict[str, Any] = {}

    def fake_create_app(load: Any, config: Any = None, **options: Any) -> Any:
        seen.update(config.app_options() if config is not None else {}, **options)
        raise SystemExit(0)  # stop before uvicorn starts

    monkeypatch.setattr(phi_onnx.serve, "create_app", fake_create_app)
    result = CliRunner().invoke(main, ["serve", str(tiny_export), "--max-batch", "4", "--port", "0"])
    assert result.exit_code == 0, result.output
    assert seen["capacity"] == 512 and "serving 512 tokens per slot" in result.output
    explicit = CliRunner().invoke(main, ["serve", str(tiny_export), "--max-batch", "4", "--port", "0",
                                         "--max-context", str(folder.default_max_length)])
    assert explicit.exit_code == 2 and "KV cache for 4 requests" in explicit.output


def test_serve_counts_the_weights_before_sizing_the_pool(monkeypatch: Any, tiny_export: Path) -> None:
    """The model loads before the pool: memory the weights take is not the pool's (else the Scheduler's own check,
    after the load, refuses in the background and the server stays unhealthy)."""
    import phi_onnx.runtime.kv_pool as kv_pool
    import phi_onnx.serve
    from phi_onnx.runtime.folder import read_folder

    folder = read_folder(tiny_export)
    tokens, nbytes = kv_pool.pool_bytes(folder, 4, 256)
    assert folder.weight_bytes > nbytes / 9  # without the weights counted, the pool would pass 0.9 x available
    monkeypatch.setattr(kv_pool, "available_memory", lambda: folder.weight_bytes + nbytes)
    monkeypatch.setattr(phi_onnx.serve, "create_app", lambda *a, **k: sys.exit(0))  # a regression: no server
    result = CliRunner().invoke(main, ["serve", str(tiny_export), "--max-batch", "4", "--port", "0",
                                       "--max-context", str(tokens)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "beside the model's" in result.output and "GiB of weights" in result.output


def test_serve_on_a_busy_port_is_one_sentence_before_the_model_loads(monkeypatch: Any, tiny_export: Path) -> None:
    import socket

    import phi_onnx.store

    def never(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the model was looked up although the port is busy")

    monkeypatch.setattr(phi_onnx.store, "resolve_model", never)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = CliRunner().invoke(main, ["serve", str(tiny_export), "--port", str(port)])
    assert result.exit_code == 2 and result.exception is not None and isinstance(result.exception, SystemExit)
    assert result.output == (f"Error: Cannot listen on 127.0.0.1:{port}: the port is already in use (another "
                             "server?); stop it or pick another with --port.\n")


@pytest.mark.parametrize(("host", "fragment"), [("192.0.2.1", "this machine has no such address; use --host"),
                                                ("no-such-host.invalid", "the host name does not resolve")])
def test_serve_on_an_address_it_cannot_have_is_one_sentence(host: str, fragment: str, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["serve", str(tmp_path / "not-even-a-folder"), "--host", host, "--port", "0"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.startswith(f"Error: Cannot listen on {host}:0: {fragment}") and result.output.count("\n") == 1


def test_serve_frees_the_port_when_it_stops_early(tmp_path: Path) -> None:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = CliRunner().invoke(main, ["serve", str(tmp_path / "missing"), "--port", str(port)])
    assert result.exit_code == 2 and "Cannot listen" not in result.output  # the folder was the problem
    with socket.socket() as again:  # and the listener it opened is closed again
        again.bind(("127.0.0.1", port))
        again.listen()


def test_model_name_repeated_gives_aliases(monkeypatch: Any, tiny_export: Path) -> None:
    """`--model-name a --model-name b`: `a` is the main id, `b` an alias; both listed and accepted."""
    served = record_served_apps(monkeypatch)
    result = CliRunner().invoke(main, ["serve", str(tiny_export), "--port", "0", "--max-batch", "1",
                                       "--max-context", "256", "--model-name", "main", "--model-name", "alias",
                                       "--model-name", "main"])
    assert result.exit_code == 0, result.output
    from fastapi.testclient import TestClient

    with TestClient(served[-1]) as client:
        wait_until_loaded(client)
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["main", "alias"]
        assert client.get("/v1/models/alias").json()["id"] == "alias"
        missing = client.get("/v1/models/other")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
        reply = client.post("/v1/completions", json={"model": "alias", "prompt": "x", "max_tokens": 1})
        assert reply.status_code == 200 and reply.json()["model"] == "alias"


def test_stall_factor_and_prefix_cache_flags_reach_the_scheduler(monkeypatch: Any, tiny_export: Path) -> None:
    served = record_served_apps(monkeypatch)
    result = CliRunner().invoke(main, ["serve", str(tiny_export), "--port", "0", "--max-batch", "1",
                                       "--max-context", "256", "--stall-factor", "3.5",
                                       "--prefix-cache-bytes", "1000000", "--cohort-tokens", "0"])
    assert result.exit_code == 0, result.output
    from fastapi.testclient import TestClient

    with TestClient(served[-1]) as client:
        wait_until_loaded(client)
        scheduler = served[-1].state.phi_onnx.client.scheduler
        assert scheduler.stall_factor == 3.5 and scheduler.cohort_tokens == 0
        assert scheduler.store is not None and scheduler.store.budget == 1_000_000
    for bad in ("0", "-1", "nan"):
        refused = CliRunner().invoke(main, ["serve", str(tiny_export), "--stall-factor", bad])
        assert refused.exit_code == 2 and "--stall-factor" in refused.output, bad
    refused = CliRunner().invoke(main, ["serve", str(tiny_export), "--cohort-tokens", "-1"])
    assert refused.exit_code == 2 and "--cohort-tokens" in refused.output


def test_create_app_refuses_a_bad_stall_factor_before_serving(tiny_model: Any) -> None:
    from phi_onnx.errors import OptionsError
    from phi_onnx.serve import create_app

    for bad in (0, -2.0, float("nan"), float("inf"), True, "2"):
        with pytest.raises(OptionsError, match="stall_factor"):
            create_app(tiny_model, stall_factor=bad)
    for bad_count in (-1, 2.5, True, "2"):
        with pytest.raises(OptionsError, match="cohort_tokens"):
            create_app(tiny_model, cohort_tokens=bad_count)
