"""Fixtures the scheduler and prefix-cache tests share."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest


@pytest.fixture(scope="module")
def models(make_export: Any) -> Iterator[Any]:
    """`models(name)` → the named tiny export loaded on the ort backend (once per module)."""
    import phi_onnx

    cache: dict[str, Any] = {}

    def get(name: str) -> Any:
        if name not in cache:
            cache[name] = phi_onnx.load(make_export(name), device="cpu", backend="ort")
        return cache[name]

    yield get
    for model in cache.values():
        model.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The bundled tiny-phi3 exported (fp32) and loaded on the ort backend, once per module."""
    import phi_onnx
    from phi_onnx.export import export

    out = tmp_path_factory.mktemp("tiny") / "tiny-phi3"
    export("tiny-phi3", out)
    model = phi_onnx.load(out, device="cpu", backend="ort")
    yield model
    model.close()
