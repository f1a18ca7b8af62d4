"""A live phi-onnx server on an ephemeral 127.0.0.1 port, over the bundled tiny-phi3 (exported once)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from serve_helpers import API_KEY, MODEL_NAME, LiveServer


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-phi3 exported int4 (the default) once per session."""
    from phi_onnx.export import export

    out = tmp_path_factory.mktemp("serve") / "tiny-phi3"
    export("tiny-phi3", out)
    return out


@pytest.fixture(scope="session")
def tiny_model(tiny_export: Path) -> Iterator[Any]:
    """The export loaded on the ort backend, on CPU."""
    import phi_onnx

    model = phi_onnx.load(tiny_export, device="cpu", backend="ort")
    yield model
    model.close()


@pytest.fixture(scope="session")
def live_server(tiny_model: Any) -> Iterator[LiveServer]:
    """The app with an API key, 4 slots and a queue of 4, 512 tokens per slot."""
    pytest.importorskip("fastapi")
    from phi_onnx.serve import create_app

    app = create_app(tiny_model, max_batch=4, max_queue=4, api_key=API_KEY, model_name=MODEL_NAME, capacity=512)
    with LiveServer(app) as server:
        yield server


@pytest.fixture()
def client(live_server: LiveServer) -> Any:
    """The real openai client (no retries, bounded timeouts)."""
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"{live_server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def phi4_server(phi4_mini_tools_export: Path) -> Iterator[LiveServer]:
    """The Phi-4-mini tools fixture (tests/conftest.py) served in its own tool format, as "phi4" with two
    aliases; no API key, 2 slots of 1024 tokens."""
    pytest.importorskip("fastapi")
    import phi_onnx
    from phi_onnx.serve import create_app

    model = phi_onnx.load(phi4_mini_tools_export, device="cpu", backend="ort")
    app = create_app(model, max_batch=2, max_queue=4, model_name="phi4", model_aliases=("phi4-alias", "p4"),
                     capacity=1024)
    with LiveServer(app) as server:
        yield server
    model.close()
