"""Prefix reuse through the server: token ids out, cached_tokens in the usage, the same text as a cold run."""

from __future__ import annotations

import json
from typing import Any

import pytest
from serve_helpers import API_KEY, MODEL_NAME, LiveServer

httpx = pytest.importorskip("httpx")
HEADERS = {"Authorization": f"Bearer {API_KEY}"}


def complete(server: Any, prompt: list[int], new: int, **extra: Any) -> dict[str, Any]:
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": new, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True, **extra}
    reply = httpx.post(f"{server.url}/v1/completions", json=body, headers=HEADERS, timeout=60)
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_a_conversation_continued_by_token_ids_reuses_its_history(live_server, tiny_model):
    system = tiny_model.encode("You answer questions about the Python standard library in one sentence.")
    first_prompt = system + tiny_model.encode(" What does os.path.join do?", add_special_tokens=False)
    first = complete(live_server, first_prompt, 12)
    ids = first["choices"][0]["token_ids"]
    assert len(ids) == 12 and tiny_model.decode(ids) == first["choices"][0]["text"]
    second_prompt = first_prompt + ids + tiny_model.encode(" And json.loads?", add_special_tokens=False)
    second = complete(live_server, second_prompt, 8)
    # Everything but the last generated token (never fed) came from the cache.
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] >= len(first_prompt) + 11
    tiny_model.engine.forget()
    cold = tiny_model.generate(second_prompt, max_new_tokens=8, min_new_tokens=8)
    assert second["choices"][0]["token_ids"] == cold.token_ids


def test_streamed_chunks_carry_their_token_ids(live_server, tiny_model):
    prompt = tiny_model.encode("def read_lines(path):")
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": 10, "temperature": 0, "ignore_eos": True,
            "stream": True, "return_token_ids": True, "stream_options": {"include_usage": True}}
    ids, usage = [], None
    with httpx.stream("POST", f"{live_server.url}/v1/completions", json=body, headers=HEADERS, timeout=60) as reply:
        for line in reply.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                usage = chunk.get("usage") or usage
                for choice in chunk["choices"]:
                    ids += choice.get("token_ids", [])
    assert len(ids) == 10 and usage["completion_tokens"] == 10
    assert "cached_tokens" in usage["prompt_tokens_details"]
    whole = complete(live_server, prompt, 10)
    assert whole["choices"][0]["token_ids"] == ids


def test_no_prefix_cache_computes_every_prompt(tiny_model):
    from phi_onnx.serve import create_app

    app = create_app(tiny_model, max_batch=2, capacity=256, prefix_cache=False, api_key=API_KEY,
                     model_name=MODEL_NAME)
    with LiveServer(app) as server:
        prompt = tiny_model.encode("What does itertools.chain do?")
        for _ in range(2):
            assert complete(server, prompt, 4)["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        scheduler = app.state.phi_onnx.scheduler
        assert not scheduler.prefix_cache and scheduler.computed_tokens == 2 * len(prompt)


def test_return_token_ids_must_be_a_boolean(live_server):
    reply = httpx.post(f"{live_server.url}/v1/completions", headers=HEADERS, timeout=30,
                       json={"model": MODEL_NAME, "prompt": "x", "return_token_ids": "yes"})
    assert reply.status_code == 400 and "return_token_ids" in reply.json()["error"]["message"]
