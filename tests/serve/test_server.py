"""The OpenAI-compatible server, driven by the real openai client over loopback."""

from __future__ import annotations

import re
import threading
import time
from typing import Any

import pytest
from serve_helpers import API_KEY, MODEL_NAME

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

QUESTION = [{"role": "user", "content": "What does os.path.join do?"}]
HEADERS = {"Authorization": f"Bearer {API_KEY}"}


def metric(server: Any, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics", headers=HEADERS, timeout=10).text
    found = re.findall(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+]+)$", text, re.M)
    assert found, f"{name} not in /metrics"
    return sum(float(value) for value in found)  # over all of a metric's labelled series


def wait_for(check: Any, seconds: float = 15) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return False


def test_chat_streaming_and_not_agree_and_usage_counts_tokens(client, tiny_model):
    whole = client.chat.completions.create(model=MODEL_NAME, messages=QUESTION, max_tokens=40)
    expected = tiny_model.chat(QUESTION, max_new_tokens=40)
    choice = whole.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected.text
    assert choice.finish_reason == {"eos": "stop", "length": "length"}[expected.finish_reason]
    assert whole.usage.prompt_tokens == len(tiny_model.chat_prompt_ids(QUESTION))
    assert whole.usage.completion_tokens == expected.new_tokens
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens

    chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=QUESTION, max_tokens=40, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == expected.new_tokens


def test_multi_turn_uses_the_chat_template(client, tiny_model):
    messages = [{"role": "system", "content": "You document Python."}, *QUESTION,
                {"role": "assistant", "content": "It joins paths."}, {"role": "user", "content": "And os.sep?"}]
    reply = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=20)
    assert reply.usage.prompt_tokens == len(tiny_model.chat_prompt_ids(messages))
    assert reply.choices[0].message.content == tiny_model.chat(messages, max_new_tokens=20).text


def test_completions_text_and_token_ids(client, tiny_model):
    prompt = "def join(a, b):\n    \"\"\""
    result = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=16)
    expected = tiny_model.generate(prompt, max_new_tokens=16)
    assert result.choices[0].text == expected.text
    assert result.usage.prompt_tokens == len(tiny_model.encode(prompt))
    assert result.usage.completion_tokens == expected.new_tokens
    ids = tiny_model.encode(prompt)
    by_ids = client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=16)
    assert by_ids.choices[0].text == expected.text
    streamed = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=16, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == expected.text


def test_stop_strings_and_logprobs(client, tiny_model):
    full = tiny_model.chat(QUESTION, max_new_tokens=40, min_new_tokens=40).text
    stop = full[10:14]
    reply = client.chat.completions.create(model=MODEL_NAME, messages=QUESTION, max_tokens=40, stop=[stop],
                                           extra_body={"min_tokens": 40})
    assert reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].message.content == full[: full.index(stop)]
    streamed = client.chat.completions.create(model=MODEL_NAME, messages=QUESTION, max_tokens=40, stop=stop,
                                              extra_body={"min_tokens": 40}, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == full[: full.index(stop)]
    scored = client.chat.completions.create(model=MODEL_NAME, messages=QUESTION, max_tokens=5, logprobs=True,
                                            top_logprobs=3)
    content = scored.choices[0].logprobs.content
    assert len(content) == 5
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)


def test_seeded_sampling_is_reproducible(client):
    def sample(seed: int) -> str:
        return client.completions.create(model=MODEL_NAME, prompt="The", max_tokens=24, temperature=1.0,
                                         top_p=0.95, seed=seed, extra_body={"ignore_eos": True}).choices[0].text
    first = sample(11)
    assert sample(11) == first
    assert any(sample(seed) != first for seed in (12, 13, 14))
    assert client.completions.create(model=MODEL_NAME, prompt="The", max_tokens=7,
                                     extra_body={"ignore_eos": True}).usage.completion_tokens == 7


def test_models_health_and_metrics(client, live_server):
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]
    health = httpx.get(f"{live_server.url}/health", timeout=10)  # open without the key
    assert health.status_code == 200 and health.json()["status"] == "ok"
    before = metric(live_server, 'phi_onnx_requests_total')
    generated = metric(live_server, "phi_onnx_generated_tokens_total")
    client.completions.create(model=MODEL_NAME, prompt="x", max_tokens=3, extra_body={"ignore_eos": True})
    assert metric(live_server, 'phi_onnx_requests_total') >= before + 1
    assert metric(live_server, "phi_onnx_generated_tokens_total") == generated + 3
    assert metric(live_server, "phi_onnx_time_to_first_token_seconds_count") >= 1
    assert metric(live_server, "phi_onnx_prompt_tokens_total") > 0


@pytest.mark.parametrize("change, status, param", [
    ({"temperature": -1}, 400, "temperature"),
    ({"top_p": 0}, 400, "top_p"),
    ({"top_p": 1.5}, 400, "top_p"),
    ({"n": 2}, 400, "n"),
    ({"max_tokens": "many"}, 400, "max_tokens"),
    ({"max_tokens": "5"}, 400, "max_tokens"),  # numbers in strings are a client bug, as in OpenAI's API
    ({"temperature": "0.5"}, 400, "temperature"),
    ({"seed": True}, 400, "seed"),
    ({"n": True}, 400, "n"),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "user"}], "stop": 3}, 400, "stop"),
    ({"model": "gpt-9"}, 404, "model"),
])
def test_invalid_requests_are_openai_errors(client, change, status, param):
    body = {"model": MODEL_NAME, "messages": QUESTION, **change}
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(**body)
    error = caught.value
    assert error.status_code == status and error.param == param
    assert error.type == "invalid_request_error"
    if status == 404:
        assert error.code == "model_not_found"


def test_context_length_exceeded_names_both_numbers(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL_NAME, prompt=[5] * 500, max_tokens=100)
    assert caught.value.code == "context_length_exceeded"
    assert "512" in caught.value.message and "600" in caught.value.message


def test_raw_http_errors(live_server):
    url = f"{live_server.url}/v1/chat/completions"
    bad_json = httpx.post(url, content=b'{"messages": [', headers={**HEADERS, "content-type": "application/json"},
                          timeout=10)
    assert bad_json.status_code == 400 and bad_json.json()["error"]["code"] == "invalid_json"
    huge = httpx.post(url, content=b"x" * (5 * 1024 * 1024), timeout=30,
                      headers={**HEADERS, "content-type": "application/json"})
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "request_too_large"
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        denied = httpx.post(url, json={"messages": QUESTION}, headers=headers, timeout=10)
        assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{live_server.url}/metrics", timeout=10).status_code == 401
    missing = httpx.get(f"{live_server.url}/v1/nothing", headers=HEADERS, timeout=10)
    assert missing.status_code == 404 and "error" in missing.json()


def test_dropped_streams_free_their_slots(client, live_server):
    stream = client.chat.completions.create(model=MODEL_NAME, messages=QUESTION, max_tokens=400, stream=True,
                                            extra_body={"ignore_eos": True})
    for _, _chunk in zip(range(5), stream, strict=False):
        pass
    assert metric(live_server, "phi_onnx_active_requests") == 1
    stream.close()  # the client goes away mid-stream
    assert wait_for(lambda: metric(live_server, "phi_onnx_active_requests") == 0)
    assert client.completions.create(model=MODEL_NAME, prompt="x", max_tokens=2).choices  # still serving


def test_a_non_streaming_client_that_gives_up_frees_its_slot(tiny_model):
    from serve_helpers import LiveServer

    from phi_onnx.serve import create_app

    with LiveServer(create_app(tiny_model, max_batch=1, capacity=4096)) as server:
        with pytest.raises(httpx.TimeoutException):
            httpx.post(f"{server.url}/v1/completions", timeout=0.3,
                       json={"prompt": "x", "max_tokens": 4000, "ignore_eos": True})
        assert wait_for(lambda: metric(server, "phi_onnx_active_requests") == 0)
        # Cancelled when the client went away, not run to its 4000 tokens.
        assert metric(server, "phi_onnx_generated_tokens_total") < 4000


def test_a_burst_beyond_the_queue_gets_503_not_a_hang(live_server):
    statuses: list[int] = []
    retry_after: list[str | None] = []

    def one() -> None:
        with httpx.stream("POST", f"{live_server.url}/v1/completions", headers=HEADERS, timeout=60,
                          json={"prompt": "x", "max_tokens": 400, "ignore_eos": True, "stream": True}) as response:
            statuses.append(response.status_code)
            retry_after.append(response.headers.get("retry-after"))
            for _ in response.iter_lines():
                pass

    threads = [threading.Thread(target=one) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(t.is_alive() for t in threads)
    assert len(statuses) == 16 and set(statuses) <= {200, 503}
    assert statuses.count(503) >= 16 - 8  # 4 slots + 4 queued
    assert all(r == "1" for s, r in zip(statuses, retry_after, strict=True) if s == 503)
    assert wait_for(lambda: metric(live_server, "phi_onnx_active_requests") == 0)


def test_rss_stays_flat_over_200_requests(client):
    def rss_mb() -> float:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024

    def ask(i: int) -> None:
        client.completions.create(model=MODEL_NAME, prompt=f"def f{i}(x):", max_tokens=8)

    for i in range(20):  # warm up allocators, caches and the KV pages the test touches
        ask(i)
    start = rss_mb()
    for i in range(200):
        ask(i)
    assert rss_mb() - start < 25  # MB: the bound; nothing is kept per request


def test_health_is_503_while_loading_then_200(tiny_model):
    from fastapi.testclient import TestClient

    from phi_onnx.serve import create_app

    release = threading.Event()

    def load() -> Any:
        release.wait(20)
        return tiny_model

    with TestClient(create_app(load, max_batch=1, capacity=64)) as client:
        loading = client.get("/health")
        assert loading.status_code == 503 and loading.json()["status"] == "loading"
        early = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert early.status_code == 503 and early.json()["error"]["code"] == "model_not_ready"
        release.set()
        assert wait_for(lambda: client.get("/health").status_code == 200)
        assert client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).json()["usage"]


def test_create_app_refuses_the_genai_backend(tiny_export):
    import phi_onnx
    from phi_onnx.errors import OptionsError
    from phi_onnx.serve import create_app

    pytest.importorskip("onnxruntime_genai")
    with phi_onnx.load(tiny_export, device="cpu", backend="genai") as model, \
            pytest.raises(OptionsError, match="ort backend"):
        create_app(model)


def test_booleans_are_strict_and_chat_requests_have_their_own_metric_label(live_server):
    url = f"{live_server.url}/v1/chat/completions"
    for field in ("stream", "logprobs", "ignore_eos"):
        bad = httpx.post(url, json={"messages": QUESTION, "max_tokens": 2, field: "yes"}, headers=HEADERS, timeout=10)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == field
    nulls = {"stream": None, "n": None, "logprobs": None, "presence_penalty": None, "frequency_penalty": None}
    ok = httpx.post(url, json={"messages": QUESTION, "max_tokens": 2, **nulls}, headers=HEADERS, timeout=30)
    assert ok.status_code == 200 and ok.json()["object"] == "chat.completion"  # null is OpenAI's "unset"
    assert metric(live_server, 'phi_onnx_requests_total{endpoint="chat_completions",model="tiny",status="200"}') >= 1


def test_health_reports_a_dead_scheduler_and_requests_get_errors_not_hangs(tiny_model):
    from fastapi.testclient import TestClient

    from phi_onnx.serve import create_app

    class Boom(BaseException):
        pass

    with TestClient(create_app(tiny_model, max_batch=1, capacity=64)) as client:
        scheduler = client.app.state.phi_onnx.scheduler

        def boom() -> None:
            raise Boom("loop broke")

        scheduler._step = boom
        answer = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert answer.status_code == 500 and "loop broke" in answer.json()["error"]["message"]
        health = client.get("/health")
        assert health.status_code == 503 and "loop broke" in health.json()["error"]
        after = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert after.status_code == 503 and after.json()["error"]["code"] == "scheduler_failed"
