"""The server's request parsing under arbitrary JSON: a parsed request or a 400 in OpenAI's shape, nothing else."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("fastapi")

from phi_onnx.serve.schema import ApiError, ChatRequest, CompletionRequest, parse

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=20)
fields = ["model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "n",
          "seed", "stop", "stream", "stream_options", "logprobs", "top_logprobs", "presence_penalty",
          "frequency_penalty", "repetition_penalty", "role", "content", "echo", "suffix"]
# Bodies near the real shape reach deeper validation than random dictionaries do.
messages = st.lists(st.fixed_dictionaries({}, optional={"role": st.sampled_from(["user", "system", "assistant", "x"])
                                                        | json_values, "content": json_values}), max_size=3)
bodies = json_values | st.dictionaries(st.sampled_from(fields), json_values | messages, max_size=8)


def _check(kind: Any, data: Any) -> None:
    try:
        request = parse(kind, data)
    except ApiError as error:
        body = error.body()["error"]
        assert error.status == 400 and isinstance(body["message"], str) and body["message"]
        assert set(body) == {"message", "type", "param", "code"}
        return
    assert isinstance(request, kind)
    if kind is ChatRequest:
        for message in request.messages:
            assert isinstance(message.text(), str)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bodies)
def test_chat_request_parsing_never_raises_anything_else(data: Any) -> None:
    _check(ChatRequest, data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bodies)
def test_completion_request_parsing_never_raises_anything_else(data: Any) -> None:
    _check(CompletionRequest, data)


def test_json_numbers_stay_valid_where_strings_and_booleans_are_not() -> None:
    """What OpenAI's clients send (JSON numbers, 1.0 for an int, token ids) parses; "5", true do not."""
    chat = parse(ChatRequest, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5.0, "seed": 7,
                               "temperature": 1, "top_logprobs": 2, "logprobs": True, "n": 1.0})
    assert (chat.max_tokens, chat.seed, chat.temperature, chat.top_logprobs, chat.n) == (5, 7, 1.0, 2, 1)
    completion = parse(CompletionRequest, {"prompt": [1.0, 2], "logprobs": 0, "max_tokens": None})
    assert (completion.prompt, completion.logprobs, completion.max_tokens) == ([1, 2], 0, None)
    for field, value in [("n", True), ("max_tokens", "5"), ("logprobs", True), ("top_p", b"1")]:
        with pytest.raises(ApiError, match=field):
            parse(CompletionRequest, {"prompt": "x", field: value})
