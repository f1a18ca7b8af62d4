"""Execution providers: auto says why it is on CPU, cuda fails loudly without CUDA, CUDA tests skip cleanly."""

from __future__ import annotations

import logging

import pytest
from helpers import random_ids

import phi_onnx
from phi_onnx.runtime.errors import DeviceError
from phi_onnx.runtime.providers import parse_device, probe_cuda, resolve_device

CUDA_PROBLEM = probe_cuda(0)
needs_cuda = pytest.mark.skipif(CUDA_PROBLEM is not None, reason=f"no working CUDA EP: {CUDA_PROBLEM}")
needs_no_cuda = pytest.mark.skipif(CUDA_PROBLEM is None, reason="CUDA works on this machine")


@needs_no_cuda
def test_auto_runs_on_cpu_and_says_why(make_export, caplog):
    probe_cuda.cache_clear()
    with caplog.at_level(logging.DEBUG, logger="phi_onnx"):  # debug level where CUDA was not expected
        model = phi_onnx.load(make_export("phi3-gqa"), backend="ort")
    assert model.provider == "CPUExecutionProvider" and model.device.name == "cpu"
    reasons = [r.getMessage() for r in caplog.records if "running on CPU" in r.getMessage()]
    assert len(reasons) == 1 and "CUDA" in reasons[0]
    assert model.device_reason in reasons[0]
    assert model.engine.session.get_providers()[0] == "CPUExecutionProvider"  # what really runs


@needs_no_cuda
@pytest.mark.parametrize("backend", ["ort", "genai"])
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_without_cuda_is_an_error_naming_the_missing_piece(make_export, backend, device):
    with pytest.raises(DeviceError) as info:
        phi_onnx.load(make_export("phi3-gqa"), device=device, backend=backend)
    message = str(info.value)
    assert device in message and CUDA_PROBLEM in message
    assert any(piece in message for piece in ("CUDA execution provider", "libcudnn", "libcublas", "driver", "device"))
    assert "onnxruntime-gpu" in (info.value.hint or "")


@pytest.mark.parametrize("bad", ["gpu", "cuda:x", "cpu:1", "auto:0", ""])
def test_unknown_device_names_are_errors(bad):
    with pytest.raises(DeviceError, match="Unknown device"):
        parse_device(bad)


def test_device_parsing():
    assert parse_device("CUDA:1") == ("cuda", 1)
    assert parse_device("cpu") == ("cpu", None)
    assert resolve_device("cpu", "cpu").name == "cpu"


def test_unknown_backend_is_an_error(make_export):
    with pytest.raises(phi_onnx.PhiOnnxError, match="backend"):
        phi_onnx.load(make_export("phi3-gqa"), backend="tensorrt")


# -- CUDA (skipped without a working CUDA execution provider) -----------------------------------

@pytest.mark.cuda
@needs_cuda
def test_cpu_export_on_cuda_is_refused(make_export):
    with pytest.raises(DeviceError, match="exported for CPU"):
        phi_onnx.load(make_export("phi3-gqa"), device="cuda", backend="ort")


@pytest.mark.cuda
@needs_cuda
def test_cuda_backends_agree_and_keep_the_cache_on_the_gpu(make_export):
    folder = make_export("phi3-gqa", precision="fp16", device="cuda")
    prompt = random_ids(16, seed=4)[0].tolist()
    ort_model = phi_onnx.load(folder, device="cuda", backend="ort")
    assert ort_model.provider == "CUDAExecutionProvider"
    result = ort_model.generate(prompt, max_new_tokens=16, min_new_tokens=16)
    assert {buffer.device_name() for buffer in ort_model.engine.buffers} == {"cuda"}
    auto = phi_onnx.load(folder, backend="ort")
    assert auto.provider == "CUDAExecutionProvider"
    try:
        genai_model = phi_onnx.load(folder, device="cuda", backend="genai")
    except DeviceError as error:  # onnxruntime-genai without CUDA support: must say so
        assert "onnxruntime-genai" in str(error)
        return
    assert genai_model.generate(prompt, max_new_tokens=16, min_new_tokens=16).token_ids == result.token_ids


@pytest.mark.cuda
@needs_cuda
def test_cuda_device_index_out_of_range_is_an_error(make_export):
    with pytest.raises(DeviceError):
        phi_onnx.load(make_export("phi3-gqa", precision="fp16", device="cuda"), device="cuda:99", backend="ort")


# -- the probe's decisions, with onnxruntime's answers simulated ----------------------------------

class FakeSession:
    """Stands in for an InferenceSession that ends up on `FakeSession.lands_on`."""

    lands_on = "CPUExecutionProvider"

    def __init__(self, model, providers):
        self.providers = providers

    def get_providers(self):
        return [self.lands_on, "CPUExecutionProvider"]


@pytest.fixture()
def fake_cuda_build(monkeypatch):
    import onnxruntime as ort

    from phi_onnx.runtime import providers

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", FakeSession)
    monkeypatch.setattr(providers, "_provider_library_problem", lambda capi: (
        "the CUDA execution provider cannot load: libcudnn.so.9: cannot open shared object file"))
    probe_cuda.cache_clear()
    yield FakeSession
    probe_cuda.cache_clear()


def test_listed_but_not_loading_cuda_is_detected(fake_cuda_build, caplog):
    fake_cuda_build.lands_on = "CPUExecutionProvider"  # what ORT does when libcudnn is missing
    with pytest.raises(DeviceError, match=r"libcudnn\.so\.9"):
        resolve_device("cuda", "cuda")
    with caplog.at_level(logging.INFO, logger="phi_onnx"):
        choice = resolve_device("auto", "cuda")
    assert choice.kind == "cpu" and "libcudnn.so.9" in choice.reason and "libcudnn.so.9" in caplog.text


def test_working_cuda_is_used_for_cuda_exports_only(fake_cuda_build):
    fake_cuda_build.lands_on = "CUDAExecutionProvider"
    assert resolve_device("auto", "cuda").name == "cuda:0"
    assert resolve_device("cuda:1", "cuda").name == "cuda:1"
    assert resolve_device("cuda:1", "cuda").ort_providers()[0] == ("CUDAExecutionProvider", {"device_id": "1"})
    cpu_export = resolve_device("auto", "cpu")
    assert cpu_export.kind == "cpu" and "export targets CPU" in cpu_export.reason
    with pytest.raises(DeviceError, match="exported for CPU"):
        resolve_device("cuda", "cpu")
