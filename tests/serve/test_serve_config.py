"""ServeConfig: the serve defaults written once, read by the CLI, create_app and Ray; fit_pool for Ray replicas."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")

from phi_onnx.errors import OptionsError
from phi_onnx.serve.config import DEFAULTS, ServeConfig


def test_the_cli_and_ray_take_their_defaults_from_serve_config() -> None:
    from phi_onnx.cli.serve import serve
    from phi_onnx.serve.ray import deployment_options

    defaults = {param.name: param.default for param in serve.params}
    for name in ("max_batch", "max_queue", "host", "port", "grace", "header_timeout", "body_timeout",
                 "max_connections"):
        assert defaults[name] == getattr(DEFAULTS, name), name
    assert deployment_options()["max_ongoing_requests"] == DEFAULTS.max_batch + DEFAULTS.max_queue == 72


def test_create_app_takes_a_config_and_keywords_over_it(tiny_model: Any) -> None:
    from fastapi.testclient import TestClient

    from phi_onnx.serve import create_app

    app = create_app(tiny_model, ServeConfig(max_batch=2, max_queue=1, model_name="cfg", capacity=256),
                     model_name="kw")
    with TestClient(app) as client:
        scheduler = app.state.phi_onnx.scheduler
        assert (scheduler.max_batch, scheduler.max_queue, scheduler.capacity) == (2, 1, 256)
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["kw"]
    with pytest.raises(TypeError, match="unexpected keyword arguments: grace, nonsense"):
        create_app(tiny_model, nonsense=1, grace=2.0)  # a listener option is the CLI's, not the app's
    with pytest.raises(OptionsError, match="body_timeout must be a positive number"):
        create_app(tiny_model, body_timeout=float("nan"))


def test_a_ray_replica_sizes_its_pool_as_the_cli_does(monkeypatch: Any, tiny_export: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """Ray replicas went without the CLI's KV-pool sizing; they share fit_pool now (no Ray needed to check)."""
    import phi_onnx.runtime.kv_pool as kv_pool
    from phi_onnx.runtime.folder import read_folder
    from phi_onnx.serve.ray import replica_config

    folder = read_folder(tiny_export)
    per_token = kv_pool.pool_bytes(folder, 4, 1)[1] // 4
    monkeypatch.setattr(kv_pool, "available_memory", lambda: folder.weight_bytes + 2 * per_token * 4 * 600)
    with caplog.at_level(logging.WARNING, logger="phi_onnx.serve.ray"):
        config = replica_config(str(tiny_export), {"device": "cpu"}, {"max_batch": 4, "model_name": "m"})
    assert (config.capacity, config.max_batch, config.model_name) == (512, 4, "m")
    assert "serving 512 tokens per slot" in caplog.text
    with pytest.raises(OptionsError, match="KV cache for 4 requests") as refused:
        replica_config(str(tiny_export), {"device": "cpu"}, {"max_batch": 4, "capacity": folder.default_max_length})
    assert "app_options" in (refused.value.hint or "")
