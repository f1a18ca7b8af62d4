"""/metrics after a small load: every series present, labelled with the model, and its counts matching
the requests that were made (one KV slot, so one request waits while another runs)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from serve_helpers import LiveServer

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
parser = pytest.importorskip("prometheus_client.parser")

NAME = "metrics-test"
CAPACITY = 1024
HISTOGRAMS = ["phi_onnx_time_to_first_token_seconds", "phi_onnx_inter_token_latency_seconds",
              "phi_onnx_e2e_request_latency_seconds", "phi_onnx_request_queue_time_seconds",
              "phi_onnx_request_prompt_tokens", "phi_onnx_request_generation_tokens"]
GAUGES = ["phi_onnx_active_requests", "phi_onnx_queued_requests", "phi_onnx_kv_slots_used",
          "phi_onnx_kv_slots_capacity", "phi_onnx_kv_tokens_used", "phi_onnx_kv_tokens_capacity",
          "phi_onnx_kv_pool_bytes"]


STEP_SECONDS = 0.02


@pytest.fixture()
def server(tiny_model: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[LiveServer]:
    """A server of its own (fresh counts): one slot of 1024 tokens, no API key.

    Each decode step takes at least STEP_SECONDS, so the 900-token stream below runs for 18 s or more:
    its client leaves long before, however slow the machine (on a fast tiny model it could otherwise
    finish first and count as "length", not "cancelled")."""
    from phi_onnx.runtime.core import DecodeCore
    from phi_onnx.serve import create_app

    decode = DecodeCore.decode

    def slow_decode(self: DecodeCore, *args: Any, **kwargs: Any) -> Any:
        time.sleep(STEP_SECONDS)
        return decode(self, *args, **kwargs)

    monkeypatch.setattr(DecodeCore, "decode", slow_decode)
    app = create_app(tiny_model, max_batch=1, max_queue=4, model_name=NAME, capacity=CAPACITY)
    with LiveServer(app) as live:
        yield live


def scrape(server: LiveServer) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Every sample as name -> [(labels, value)]."""
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in parser.text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def value(samples: dict[str, Any], name: str, **labels: str) -> float:
    return sum(v for found, v in samples.get(name, []) if all(found.get(k) == w for k, w in labels.items()))


def wait_for(server: LiveServer, check: Any, seconds: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + seconds
    while True:
        samples = scrape(server)
        if check(samples):
            return samples
        assert time.monotonic() < deadline, f"the metrics never got there: {samples}"
        time.sleep(0.05)


def test_metrics_after_a_small_load_match_the_requests(server: LiveServer, tiny_model: Any) -> None:
    chat = f"{server.url}/v1/chat/completions"
    completions = f"{server.url}/v1/completions"
    question = [{"role": "user", "content": "What does os.path.join do?"}]
    answers: list[dict[str, Any]] = []  # the usage and finish_reason of each completed request

    def post(url: str, body: dict[str, Any]) -> None:
        reply = httpx.post(url, json=body, timeout=60)
        assert reply.status_code == 200, reply.text
        data = reply.json()
        answers.append({"usage": data["usage"], "finish": data["choices"][0]["finish_reason"]})

    post(chat, {"messages": question, "max_tokens": 6, "ignore_eos": True})
    post(completions, {"prompt": "import os", "max_tokens": 4, "ignore_eos": True})
    probe = httpx.post(completions, json={"prompt": "def ", "max_tokens": 12, "temperature": 0}, timeout=60).json()
    text = probe["choices"][0]["text"]
    answers.append({"usage": probe["usage"], "finish": probe["choices"][0]["finish_reason"]})
    # The same request again, stopped by a string the greedy reply holds (or by EOS): finish "stop".
    post(completions, {"prompt": "def ", "max_tokens": 12, "temperature": 0, "stop": [text[2:5] or "\n"]})
    assert answers[-1]["finish"] == "stop"
    # A streamed request holds the one slot; a second one waits; the stream's client goes away.
    with httpx.stream("POST", chat, json={"messages": question, "max_tokens": 900, "ignore_eos": True,
                                          "stream": True, "stream_options": {"include_usage": True}},
                      timeout=60) as stream:
        lines = stream.iter_lines()  # kept: a closed iterator would close the stream
        for line in lines:  # until the first token
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                break
        held = wait_for(server, lambda s: value(s, "phi_onnx_kv_tokens_used") > len(tiny_model.chat_prompt_ids(
            question)))
        assert value(held, "phi_onnx_active_requests") == value(held, "phi_onnx_kv_slots_used") == 1
        waiting = threading.Thread(target=post, args=(chat, {"messages": question, "max_tokens": 3,
                                                             "ignore_eos": True}))
        waiting.start()
        wait_for(server, lambda s: value(s, "phi_onnx_queued_requests") == 1)
        time.sleep(0.3)  # the waiting request's queue time is at least this
    waiting.join(60)
    assert not waiting.is_alive()
    refused = httpx.post(chat, json={"messages": question, "max_tokens": CAPACITY}, timeout=10)
    assert refused.status_code == 400  # counted by endpoint and status only

    submitted = len(answers) + 1  # the completed ones and the cancelled stream
    samples = wait_for(server, lambda s: value(s, "phi_onnx_e2e_request_latency_seconds_count") == submitted)
    for name, found in samples.items():
        if name.startswith("phi_onnx_"):
            assert all(labels.get("model") == NAME for labels, _ in found), name
    for name in GAUGES + [f"{h}_{part}" for h in HISTOGRAMS for part in ("count", "sum", "bucket")]:
        assert name in samples, name

    # HTTP answers by endpoint and status.
    assert value(samples, "phi_onnx_requests_total", endpoint="chat_completions", status="200") == 3
    assert value(samples, "phi_onnx_requests_total", endpoint="completions", status="200") == 3
    assert value(samples, "phi_onnx_requests_total", endpoint="chat_completions", status="400") == 1
    # Per request: one observation each, for every request the scheduler took (not the refused one).
    for histogram in HISTOGRAMS:
        count = value(samples, f"{histogram}_count")
        if histogram != "phi_onnx_inter_token_latency_seconds":  # per token (below)
            assert count == submitted, histogram
        buckets = sorted((float(labels["le"]), v) for labels, v in samples[f"{histogram}_bucket"])
        assert [v for _, v in buckets] == sorted(v for _, v in buckets), histogram  # cumulative
        assert buckets[-1] == (float("inf"), count)
    finished = {labels["reason"]: v for labels, v in samples["phi_onnx_finished_requests_total"]}
    expected: dict[str, float] = {"cancelled": 1}
    for answer in answers:
        expected[answer["finish"]] = expected.get(answer["finish"], 0) + 1
    assert finished == expected
    # Tokens: the prompt and generated counters equal the per-request histograms' sums and the usage.
    generated = value(samples, "phi_onnx_generated_tokens_total")
    known = sum(a["usage"]["completion_tokens"] for a in answers)
    assert generated == value(samples, "phi_onnx_request_generation_tokens_sum") > known  # + the cancelled one's
    prompt = value(samples, "phi_onnx_prompt_tokens_total")
    cancelled_prompt = len(tiny_model.chat_prompt_ids(question))
    assert prompt == value(samples, "phi_onnx_request_prompt_tokens_sum") == (
        sum(a["usage"]["prompt_tokens"] for a in answers) + cancelled_prompt)
    # One inter-token gap fewer than tokens in each request.
    assert value(samples, "phi_onnx_inter_token_latency_seconds_count") == generated - submitted
    # Latencies: positive and ordered; the request that waited for the slot waited at least 0.3 s.
    ttft = value(samples, "phi_onnx_time_to_first_token_seconds_sum")
    e2e = value(samples, "phi_onnx_e2e_request_latency_seconds_sum")
    queue = value(samples, "phi_onnx_request_queue_time_seconds_sum")
    assert 0 < queue < ttft < e2e and queue >= 0.3
    assert value(samples, "phi_onnx_request_queue_time_seconds_bucket", le="0.25") <= submitted - 1
    # The KV pool: all free again, its size as the scheduler allocated it.
    scheduler = server.server.config.app.state.phi_onnx.scheduler
    assert value(samples, "phi_onnx_kv_slots_capacity") == 1
    assert value(samples, "phi_onnx_kv_tokens_capacity") == CAPACITY
    assert value(samples, "phi_onnx_kv_pool_bytes") == scheduler.pool_bytes > 0
    for gauge in ("phi_onnx_active_requests", "phi_onnx_queued_requests", "phi_onnx_kv_slots_used",
                  "phi_onnx_kv_tokens_used"):
        assert value(samples, gauge) == 0, gauge
    # Prefix reuse: every prompt token was reused, copied or computed, as the scheduler counted them.
    assert value(samples, "phi_onnx_prompt_tokens_reused_total") == scheduler.reused_tokens
    assert value(samples, "phi_onnx_prompt_tokens_copied_total") == scheduler.copied_tokens
    assert value(samples, "phi_onnx_prompt_tokens_computed_total") == scheduler.computed_tokens > 0
    assert value(samples, "phi_onnx_prefix_cache_slot_tokens") == scheduler.idle_tokens > 0  # the last one's


def test_the_grafana_dashboard_graphs_series_the_server_has() -> None:
    import re
    from pathlib import Path

    from phi_onnx.serve.metrics import Metrics

    dashboard = json.loads((Path(__file__).parents[2] / "examples" / "grafana" / "phi-onnx-dashboard.json")
                           .read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    served = {family.name for family in Metrics(lambda: None, lambda: "m").registry.collect()}
    used = {name if name in served else re.sub(r"_(bucket|sum|count|total)$", "", name)
            for e in exprs for name in re.findall(r"phi_onnx_\w+", e)}
    assert used <= served, used - served
    assert {re.sub(r"_seconds$|_tokens$", "", h) for h in HISTOGRAMS} <= {re.sub(r"_seconds$|_tokens$", "", u)
                                                                        for u in used}  # every histogram graphed
    assert all('model=~"$model"' in e for e in exprs)


def test_a_request_finished_before_submit_returned_still_counts_once() -> None:
    """The scheduler thread may finish a request before `submit` hands it to the event loop."""
    from types import SimpleNamespace

    from phi_onnx.runtime.scheduler import FinishEvent, TokenEvent
    from phi_onnx.serve.metrics import Metrics

    metrics = Metrics(lambda: None, lambda: "m")
    tracked = metrics.track()
    job = SimpleNamespace(submitted_at=tracked.started, first_token_at=tracked.started + 0.5)
    tracked.event(TokenEvent(7, "x"))
    tracked.event(FinishEvent("eos", 4, 1, "x"))
    tracked.submitted(job, 4)  # type: ignore[arg-type]
    registry = metrics.registry
    assert registry.get_sample_value("phi_onnx_request_queue_time_seconds_count", {"model": "m"}) == 1
    assert registry.get_sample_value("phi_onnx_request_queue_time_seconds_sum", {"model": "m"}) == 0.5
    assert registry.get_sample_value("phi_onnx_finished_requests_total", {"model": "m", "reason": "stop"}) == 1
    assert registry.get_sample_value("phi_onnx_prompt_tokens_total", {"model": "m"}) == 4


def test_gauges_read_the_scheduler_and_leave_out_what_it_does_not_count() -> None:
    from types import SimpleNamespace

    from phi_onnx.serve.metrics import Metrics

    scheduler = SimpleNamespace(active=2, queued=1, max_batch=4, capacity=128, pool_bytes=4096, held_tokens=17)
    registry = Metrics(lambda: scheduler, lambda: "m").registry
    read = {name: registry.get_sample_value(name, {"model": "m"}) for name in GAUGES}
    assert read == {"phi_onnx_active_requests": 2, "phi_onnx_queued_requests": 1, "phi_onnx_kv_slots_used": 2,
                    "phi_onnx_kv_slots_capacity": 4, "phi_onnx_kv_tokens_used": 17,
                    "phi_onnx_kv_tokens_capacity": 512, "phi_onnx_kv_pool_bytes": 4096}
    del scheduler.held_tokens  # a scheduler without per-slot counts: no sample rather than a made-up 0
    assert registry.get_sample_value("phi_onnx_kv_tokens_used", {"model": "m"}) is None
    assert registry.get_sample_value("phi_onnx_kv_slots_used", {"model": "m"}) == 2


def test_lora_gauges_read_the_adapter_bank_and_are_absent_without_one() -> None:
    from types import SimpleNamespace

    from phi_onnx.serve.metrics import Metrics

    bank = SimpleNamespace(loaded=("a2",), max_loaded=1)
    scheduler = SimpleNamespace(active=0, queued=0, max_batch=4, capacity=128, pool_bytes=4096,
                                model=SimpleNamespace(core=SimpleNamespace(lora=bank)))
    registry = Metrics(lambda: scheduler, lambda: "m").registry
    assert registry.get_sample_value("phi_onnx_lora_adapters_loaded", {"model": "m"}) == 1
    assert registry.get_sample_value("phi_onnx_lora_adapters_max", {"model": "m"}) == 1
    bank.max_loaded, bank.loaded = None, ("a1", "a2", "a3")
    assert registry.get_sample_value("phi_onnx_lora_adapters_loaded", {"model": "m"}) == 3
    assert registry.get_sample_value("phi_onnx_lora_adapters_max", {"model": "m"}) is None  # unbounded
    scheduler.model = SimpleNamespace(core=SimpleNamespace(lora=None))  # an export without adapters
    assert registry.get_sample_value("phi_onnx_lora_adapters_loaded", {"model": "m"}) is None
