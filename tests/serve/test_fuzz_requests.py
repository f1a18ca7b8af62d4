"""The server's request parsing under arbitrary JSON, raw bytes and hostile HTTP: a parsed request or an error in
OpenAI's shape, nothing else; and the OpenAI fields phi-onnx refuses, passes or ignores."""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

pytest.importorskip("fastapi")

from phi_onnx.serve.schema import ApiError, ChatRequest, CompletionRequest, ResponsesRequest, parse, parse_responses

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=20)
fields = ["model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "n",
          "seed", "stop", "stream", "stream_options", "logprobs", "top_logprobs", "presence_penalty",
          "frequency_penalty", "repetition_penalty", "role", "content", "echo", "suffix", "tools", "tool_choice",
          "parallel_tool_calls", "response_format", "logit_bias", "functions", "function_call"]
# The new request shapes: tools, response formats, tool history, logit_bias, prompt lists, Responses input items.
names = st.sampled_from(["f", "get_weather", "", "bad name!"]) | st.text(max_size=8)
schemas = st.sampled_from([{"type": "object"}, {"type": "array", "uniqueItems": True}, {"$ref": "#/nope"},
                           {"type": "string", "pattern": "(?=x)"}, {}]) | json_values
tool_specs = st.lists(st.fixed_dictionaries({"type": st.sampled_from(["function", "web_search"]) | json_values},
                                            optional={"function": st.fixed_dictionaries(
                                                {"name": names}, optional={"parameters": schemas,
                                                                           "description": json_values})}), max_size=3)
choices = st.sampled_from(["none", "auto", "required", "any"]) | st.fixed_dictionaries(
    {"type": st.just("function"), "function": st.fixed_dictionaries({"name": names})}) | json_values
formats = st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "json_object", "json_schema", "regex", "lark", "xml"])},
    optional={"json_schema": st.fixed_dictionaries({}, optional={"name": names, "schema": schemas,
                                                                 "strict": json_values}),
              "regex": st.text(max_size=10) | json_values, "lark": st.text(max_size=10)})
history = st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "tool", "function"])},
    optional={"content": st.text(max_size=8) | json_values, "tool_call_id": st.text(max_size=6) | json_values,
              "tool_calls": st.lists(st.fixed_dictionaries(
                  {"id": st.text(max_size=6), "type": st.just("function"),
                   "function": st.fixed_dictionaries({"name": names, "arguments": st.text(max_size=10) | json_values})}
              ) | json_values, max_size=2)}), min_size=1, max_size=4)
biases = st.dictionaries(st.text(max_size=4) | st.integers(0, 99).map(str), json_values | st.floats(), max_size=3)
tool_bodies = st.fixed_dictionaries(
    {"messages": history},
    optional={"tools": tool_specs, "tool_choice": choices, "response_format": formats | json_values,
              "parallel_tool_calls": json_values, "logit_bias": biases | json_values,
              "functions": st.lists(st.fixed_dictionaries({"name": names}), max_size=2) | json_values,
              "function_call": choices})
prompt_lists = st.fixed_dictionaries({"prompt": st.lists(st.text(max_size=5), max_size=70)
                                      | st.lists(st.lists(st.integers(-2, 99), max_size=3), max_size=4)
                                      | st.lists(st.text(max_size=3) | st.lists(st.integers(0, 9)), max_size=3)},
                                     optional={"logit_bias": biases})
input_items = st.lists(st.fixed_dictionaries(
    {"type": st.sampled_from(["message", "function_call", "function_call_output", "item_reference", "reasoning"])
     | json_values},
    optional={"role": st.sampled_from(["user", "assistant", "system", "tool"]) | json_values,
              "content": st.text(max_size=8) | st.lists(st.fixed_dictionaries(
                  {"type": st.sampled_from(["input_text", "input_image", "output_text", "x"]),
                   "text": st.text(max_size=5) | json_values}), max_size=2) | json_values,
              "call_id": st.text(max_size=5) | json_values, "name": names, "arguments": st.text(max_size=8)
              | json_values, "output": st.text(max_size=8) | json_values}), max_size=4)
responses_bodies = json_values | st.fixed_dictionaries(
    {"input": st.text(max_size=10) | input_items | json_values},
    optional={"instructions": json_values, "tools": st.lists(st.fixed_dictionaries(
        {"type": st.sampled_from(["function", "web_search"]), "name": names},
        optional={"parameters": schemas, "strict": json_values}), max_size=2) | json_values,
        "tool_choice": choices, "text": st.fixed_dictionaries({}, optional={"format": st.fixed_dictionaries(
            {"type": st.sampled_from(["text", "json_object", "json_schema", "regex"])},
            optional={"schema": schemas, "name": names, "regex": json_values})}) | json_values,
        "max_output_tokens": json_values, "store": json_values, "previous_response_id": json_values,
        "stream": json_values, "temperature": json_values})
# Bodies near the real shape reach deeper validation than random dictionaries do.
messages = st.lists(st.fixed_dictionaries({}, optional={"role": st.sampled_from(["user", "system", "assistant", "x"])
                                                        | json_values, "content": json_values}), max_size=3)
bodies = json_values | st.dictionaries(st.sampled_from(fields), json_values | messages, max_size=8)


def _check(kind: Any, data: Any) -> None:
    try:
        request = parse_responses(data) if kind is ResponsesRequest else parse(kind, data)
        if kind is ResponsesRequest:
            parse(ChatRequest, request.chat_body())  # what the endpoint does next
    except ApiError as error:
        body = error.body()["error"]
        assert error.status == 400 and isinstance(body["message"], str) and body["message"]
        assert set(body) == {"message", "type", "param", "code"}
        return
    assert isinstance(request, kind)
    if kind is ChatRequest:
        for message in request.messages:
            assert isinstance(message.text(), str)
            assert isinstance(message.as_dict(), dict)
        request.tool_list(), request.choice()
        if request.response_format is not None:
            assert isinstance(request.response_format.constraint(), dict)
    if kind is CompletionRequest:
        assert request.prompts() and all(isinstance(p, str | list) for p in request.prompts())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bodies)
def test_chat_request_parsing_never_raises_anything_else(data: Any) -> None:
    _check(ChatRequest, data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bodies)
def test_completion_request_parsing_never_raises_anything_else(data: Any) -> None:
    _check(CompletionRequest, data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tool_bodies)
def test_tools_formats_history_and_bias_parse_or_get_a_400(data: Any) -> None:
    _check(ChatRequest, data)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prompt_lists)
def test_prompt_lists_parse_or_get_a_400(data: Any) -> None:
    _check(CompletionRequest, data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(responses_bodies)
def test_responses_request_parsing_never_raises_anything_else(data: Any) -> None:
    _check(ResponsesRequest, data)


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


# -- over a real socket: raw bytes, pathological JSON, hostile headers --------------------------------------------
# Every answer is JSON in OpenAI's error shape (or a completion), nothing is logged as a crash, and the server keeps
# serving. The live server runs in this process: its RSS is this process's.

httpx = pytest.importorskip("httpx")


class CrashLog(logging.Handler):
    """ERROR records (uvicorn's "Exception in ASGI application", phi-onnx's own) seen while it is attached."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def fuzz_server(tiny_model: Any) -> Iterator[tuple[Any, CrashLog]]:
    from serve_helpers import LiveServer

    from phi_onnx.serve import create_app

    crashes = CrashLog()
    loggers = [logging.getLogger(name) for name in ("uvicorn.error", "phi_onnx")]
    for logger in loggers:
        logger.addHandler(crashes)
    with LiveServer(create_app(tiny_model, max_batch=2, max_queue=8, capacity=256)) as server:
        yield server, crashes
    for logger in loggers:
        logger.removeHandler(crashes)


def _assert_openai_answer(status: int, kind: str, body: bytes) -> None:
    assert kind.startswith("application/json"), (status, kind, body[:200])
    data = json.loads(body)
    if status == 200 and "status" in data:  # GET /health: a header line h11 accepts (e.g. " ", obs-fold)
        assert data["status"] == "ok"
        return
    if status == 200:
        assert data["choices"] and data["usage"]
        return
    assert 400 <= status < 600 and set(data) == {"error"}
    assert set(data["error"]) == {"message", "type", "param", "code"} and data["error"]["message"]


def _post(server: Any, path: str, body: bytes, headers: dict[str, str] | None = None) -> None:
    answer = httpx.post(server.url + path, content=body, timeout=60,
                        headers={"Content-Type": "application/json", **(headers or {})})
    _assert_openai_answer(answer.status_code, answer.headers.get("content-type", ""), answer.content)


def _nested(depth: int, opener: str) -> bytes:
    closer = {"[": "]", '{"a":': "}"}[opener]
    return (opener * depth + "1" + closer * depth).encode()


PATHS = st.sampled_from(["/v1/chat/completions", "/v1/completions"])
huge_integer = st.integers(4301, 20_000).map(lambda n: "9" * n)
lone_surrogate = st.sampled_from(["\\ud800", "\\udfff", "x\\udbff", "\\udc00y", "\\ud83d"])
pathological = st.one_of(
    st.integers(1, 200_000).flatmap(lambda d: st.sampled_from([_nested(d, "["), _nested(d, '{"a":')])),
    st.tuples(st.sampled_from([*fields, "unknown_field"]), huge_integer).map(
        lambda f: f'{{"messages": [{{"role": "user", "content": "x"}}], "prompt": "x", "{f[0]}": {f[1]}}}'.encode()),
    st.tuples(st.sampled_from(["content", "model", "prompt", "stop", "user", "extra"]), lone_surrogate).map(
        lambda f: (f'{{"messages": [{{"role": "user", "content": "{f[1] if f[0] == "content" else "x"}"}}], '
                   f'"prompt": "{f[1] if f[0] == "prompt" else "x"}", "{f[0]}": "{f[1]}", "max_tokens": 1}}').encode()),
    st.tuples(st.sampled_from(["content", "model", "prompt", "stop", "max_tokens", "extra"]),
              st.integers(100_000, 3_900_000)).map(  # huge strings (the body limit is 4 MiB)
        lambda f: (f'{{"messages": [{{"role": "user", "content": "{"a" * f[1] if f[0] == "content" else "x"}"}}], '
                   f'"prompt": "{"a" * f[1] if f[0] == "prompt" else "x"}", "{f[0]}": "{"b" * f[1]}", '
                   '"max_tokens": 1}').encode()),
    st.sampled_from([b"NaN", b'{"prompt": "x", "temperature": NaN}', b'{"prompt": Infinity}', b"\xef\xbb\xbf{}",
                     b'{"prompt": "x", "prompt": [1]}', b'{"prompt": "x"', b"", b"null", b"[]", b'"x"', b"1e999",
                     b'{"prompt": "x", "max_tokens": 1e999}', b'{"prompt": [1e999]}', b'{"prompt": [-0.0]}']),
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(PATHS, st.binary(max_size=300) | pathological)
def test_raw_bytes_and_pathological_json_over_a_socket(fuzz_server: Any, path: str, body: bytes) -> None:
    server, crashes = fuzz_server
    _post(server, path, body)
    assert not crashes.records, crashes.records[0].getMessage()
    grown = _rss_mib() - _RSS.setdefault("baseline", _rss_mib())  # from the first example on
    _RSS["most"] = max(_RSS.get("most", 0.0), grown)
    assert grown < RSS_BOUND_MIB, grown


#: How far this process's RSS may grow over the fuzz run (measured: 37 MiB at most; bodies up to 4 MiB decode to
#: several copies in flight).
RSS_BOUND_MIB = 100
_RSS: dict[str, float] = {}


def _rss_mib() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(PATHS, st.binary(max_size=120).filter(lambda b: b"\r\n\r\n" not in b),
       st.sampled_from(["request line", "header", "host", "content-type", "origin"]))
@example(path="/v1/completions", junk=b" ", where="header")  # a header line of one space: GET /health is 200
def test_garbage_http_gets_a_json_answer(fuzz_server: Any, path: str, junk: bytes, where: str) -> None:
    """Random bytes where HTTP has structure: h11's parse errors, odd Host/Origin/Content-Type values."""
    server, crashes = fuzz_server
    body = b'{"prompt": "x", "max_tokens": 1}'
    line = junk.replace(b"\r", b"").replace(b"\n", b"") or b"x"
    request = {
        "request line": line + b"\r\nHost: 127.0.0.1\r\n\r\n",
        "header": b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n" + line + b"\r\n\r\n",
        "host": b"GET /health HTTP/1.1\r\nHost: " + line + b"\r\n\r\n",
        "content-type": (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
                         "Content-Type: ").encode() + line + b"\r\n\r\n" + body,
        "origin": (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\nContent-Type: "
                   "application/json\r\nOrigin: ").encode() + line + b"\r\n\r\n" + body,
    }[where]
    with socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1])), timeout=30) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        raw = b""
        while piece := sock.recv(65536):
            raw += piece
    while raw.startswith(b"HTTP/1.1 1"):  # an interim 100 Continue (sent to half-closed clients)
        raw = raw[raw.index(b"\r\n\r\n") + 4:]
    head, _, payload = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 "), raw[:200]
    headers = dict(line.split(b": ", 1) for line in head.split(b"\r\n")[1:])
    if headers.get(b"transfer-encoding") == b"chunked":
        payload = b"".join(payload.split(b"\r\n")[1::2])  # one small chunk
    _assert_openai_answer(int(head.split()[1]), headers.get(b"content-type", b"").decode(), payload)
    assert not crashes.records, crashes.records[0].getMessage()


def test_pathological_bodies_named_in_the_issue_get_clear_400s_and_the_server_keeps_serving(fuzz_server: Any) -> None:
    server, crashes = fuzz_server
    chat = "/v1/chat/completions"
    cases = [
        (chat, '{"messages": [{"role": "user", "content": "\\ud800"}]}', "lone UTF-16 surrogate", "messages.0.content"),
        ("/v1/completions", '{"prompt": "a\\udfffb"}', "lone UTF-16 surrogate", "'prompt'"),
        (chat, '{"model": "\\ud800", "messages": [{"role": "user", "content": "x"}]}', "surrogate", "'model'"),
        (chat, "[" * 100_000 + "]" * 100_000, "nested too deeply", ""),
        (chat, '{"messages": [], "whatever": ' + "7" * 5000 + "}", "more than 4300 digits", ""),
        (chat, '{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}',
         "takes text only", "messages.0.content.0"),
        (chat, '{"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]}',
         "takes text only", "messages.0.content.0"),
        ("/v1/completions", '{"prompt": []}', "empty list holds no prompt", "prompt"),
        ("/v1/completions", '{"prompt": [-1]}', "token ids are 0 or more", "prompt"),
        ("/v1/completions", '{"prompt": [5000000000]}', "outside the vocabulary", "prompt"),
    ]
    for path, body, message, where in cases:
        answer = httpx.post(server.url + path, content=body.encode(), timeout=30,
                            headers={"Content-Type": "application/json"})
        assert answer.status_code == 400, (body[:80], answer.text)
        error = answer.json()["error"]
        assert message in error["message"] and where in error["message"] + str(error["param"]), (body[:80], error)
    messages = {httpx.post(server.url + "/v1/completions", json={"prompt": p}, timeout=30).json()["error"]["message"]
                for p in ([], [-1])}
    assert len(messages) == 2  # distinct, each saying what is wrong
    raw = httpx.post(server.url + chat, content=b"\xff\xfe\x00garbage", timeout=30,
                     headers={"Content-Type": "application/json"})
    assert raw.status_code == 400 and "not UTF-8" in raw.json()["error"]["message"]
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    ok = httpx.post(server.url + "/v1/completions", json={"prompt": "def", "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1
    assert not crashes.records


@pytest.mark.parametrize("field, value", [
    ("modalities", ["text", "audio"]), ("audio", {"voice": "alloy", "format": "wav"}),
    ("prediction", {"type": "content", "content": "x"}), ("web_search_options", {}), ("service_tier", "flex"),
    ("reasoning_effort", "low"), ("verbosity", "high"), ("n", 2),
])
def test_chat_fields_phi_onnx_cannot_honour_are_400s_naming_them(fuzz_server: Any, field: str, value: Any) -> None:
    server, _ = fuzz_server
    answer = httpx.post(server.url + "/v1/chat/completions", timeout=30,
                        json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, field: value})
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["param"] == field and f"'{field}'" in error["message"]


@pytest.mark.parametrize("field, value", [("best_of", 2), ("echo", True), ("suffix", "}"), ("n", 3)])
def test_completion_fields_phi_onnx_cannot_honour_are_400s_naming_them(fuzz_server: Any, field: str,
                                                                       value: Any) -> None:
    server, _ = fuzz_server
    answer = httpx.post(server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 1, field: value},
                        timeout=30)
    assert answer.status_code == 400 and answer.json()["error"]["param"] == field


def test_fields_that_ask_for_nothing_and_harmless_ones_pass(fuzz_server: Any, caplog: Any) -> None:
    """null, [] and the defaults ask for nothing; user/metadata/store change no output; vendor extras are logged."""
    server, _ = fuzz_server
    chat = {"messages": [{"role": "user", "content": "hi", "name": "ann"},
                         {"role": "assistant", "content": "yo", "tool_calls": [], "refusal": None, "audio": None,
                          "annotations": []},
                         {"role": "user", "content": [{"type": "text", "text": "more"}]}],
            "max_tokens": 2, "response_format": {"type": "text"}, "tools": [], "tool_choice": "none",
            "functions": None, "parallel_tool_calls": None, "logit_bias": {}, "modalities": ["text"], "audio": None,
            "service_tier": "auto", "verbosity": "medium", "store": True, "metadata": {"k": "v"}, "user": "u1",
            "safety_identifier": "s", "prompt_cache_key": "p", "prompt_cache_retention": "24h",
            "stream_options": None, "vendor_extra_xyz": {"deep": [1, 2]}}
    with caplog.at_level(logging.INFO, logger="phi_onnx.serve.schema"):
        answer = httpx.post(server.url + "/v1/chat/completions", json=chat, timeout=60)
    assert answer.status_code == 200, answer.text
    assert "'vendor_extra_xyz'" in caplog.text and "'store'" not in caplog.text
    completion = {"prompt": "x", "max_tokens": 2, "best_of": 1, "echo": False, "suffix": None, "logit_bias": None,
                  "n": 1, "user": "u"}
    assert httpx.post(server.url + "/v1/completions", json=completion, timeout=60).status_code == 200


@pytest.mark.parametrize("field, value", [
    ("response_format", {"type": "xml"}), ("response_format", {"type": "regex"}), ("response_format", "json"),
    ("tools", [{"type": "function"}]), ("tools", [{"type": "code_interpreter"}]), ("tool_choice", "any"),
    ("functions", [{}]), ("function_call", "required"), ("parallel_tool_calls", "yes"), ("logit_bias", "x"),
    ("logit_bias", {"a": 1}), ("logit_bias", {"1": "x"}),
])
def test_honoured_tool_and_format_fields_with_bad_values_are_400s_naming_them(fuzz_server: Any, field: str,
                                                                               value: Any) -> None:
    server, _ = fuzz_server
    answer = httpx.post(server.url + "/v1/chat/completions", timeout=30,
                        json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, field: value})
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"].split(".")[0] == field and error["message"], error


def test_tool_history_is_taken_and_what_it_cannot_be_is_refused(fuzz_server: Any) -> None:
    server, _ = fuzz_server
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    ok = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [call]},
          {"role": "tool", "content": "42", "tool_call_id": "c1"}]
    answer = httpx.post(server.url + "/v1/chat/completions", json={"messages": ok, "max_tokens": 1}, timeout=60)
    assert answer.status_code == 200, answer.text
    for messages, param in (
            ([{"role": "tool", "content": "42"}], "messages.0"),
            ([{"role": "function", "content": "42", "name": "f"}], "messages.0.role"),
            ([{"role": "assistant", "function_call": {"name": "f", "arguments": "{}"}}], "messages.0.function_call"),
            ([{"role": "assistant", "tool_calls": [{"id": "c1", "type": "function"}]}],
             "messages.0.tool_calls.0.function"),
            ([{"role": "user", "content": "x", "tool_calls": [call]}], "messages.0"),
            ([{"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}]}], "messages.0.content.0"),
            ([{"role": "assistant", "refusal": "no"}], "messages.0.refusal")):
        answer = httpx.post(server.url + "/v1/chat/completions", json={"messages": messages}, timeout=30)
        assert answer.status_code == 400 and answer.json()["error"]["param"] == param, answer.text


def test_every_documented_field_is_classified() -> None:
    """OpenAI's documented request fields (as of 2025), each honoured, refused or ignored in one place."""
    from phi_onnx.serve.schema import (
        CHAT_FIELDS,
        COMPLETION_FIELDS,
        MESSAGE_FIELDS,
        RESPONSES_FIELDS,
        STREAM_OPTION_FIELDS,
    )

    chat = {"messages", "model", "audio", "frequency_penalty", "function_call", "functions", "logit_bias", "logprobs",
            "max_completion_tokens", "max_tokens", "metadata", "modalities", "n", "parallel_tool_calls", "prediction",
            "presence_penalty", "prompt_cache_key", "prompt_cache_retention", "reasoning_effort", "response_format",
            "safety_identifier", "seed", "service_tier", "stop", "store", "stream", "stream_options", "temperature",
            "tool_choice", "tools", "top_logprobs", "top_p", "user", "verbosity", "web_search_options"}
    completion = {"model", "prompt", "best_of", "echo", "frequency_penalty", "logit_bias", "logprobs", "max_tokens",
                  "n", "presence_penalty", "seed", "stop", "stream", "stream_options", "suffix", "temperature",
                  "top_p", "user"}
    assert set(CHAT_FIELDS) == chat and set(COMPLETION_FIELDS) == completion
    assert set(MESSAGE_FIELDS) == {"role", "content", "name", "tool_calls", "function_call", "tool_call_id", "audio",
                                   "refusal"}
    assert set(STREAM_OPTION_FIELDS) == {"include_usage", "include_obfuscation"}
    responses = {"access_programs", "background", "background_options", "context_management", "conversation",
                 "image", "include", "input", "instructions", "max_output_tokens", "max_tool_calls", "metadata",
                 "model", "moderation", "parallel_tool_calls", "previous_response_id", "prompt", "prompt_cache_key",
                 "prompt_cache_options", "prompt_cache_retention", "reasoning", "safety_identifier", "service_tier",
                 "store", "stream", "stream_options", "temperature", "text", "tool_choice", "tools", "top_logprobs",
                 "top_p", "truncation", "user"}
    assert set(RESPONSES_FIELDS) == responses
    for name in ("tools", "tool_choice", "response_format", "logit_bias", "parallel_tool_calls"):
        assert CHAT_FIELDS[name].action == "honoured", name
    for table in (CHAT_FIELDS, COMPLETION_FIELDS, MESSAGE_FIELDS, STREAM_OPTION_FIELDS, RESPONSES_FIELDS):
        for name, policy in table.items():
            assert policy.action in ("honoured", "refused", "ignored"), name
            assert policy.action == "honoured" or policy.note, name


def test_the_composition_bound_holds_for_every_character() -> None:
    """NFC/NFKC join at most MAX_COMPOSED input characters into one: the longest canonical decomposition."""
    import sys
    import unicodedata

    from phi_onnx.serve.limits import MAX_COMPOSED

    assert max(len(unicodedata.normalize("NFD", chr(c))) for c in range(sys.maxunicode + 1)) == MAX_COMPOSED
    assert all(len(chr(c).lower()) >= 1 for c in range(0, sys.maxunicode + 1, 7))  # Lowercase never deletes


def test_error_messages_do_not_echo_megabytes(fuzz_server: Any) -> None:
    server, _ = fuzz_server
    for body in ({"model": "m" * 3_000_000, "prompt": "x"}, {"prompt": "x", "max_tokens": "9" * 3_000_000}):
        answer = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
        assert answer.status_code in (400, 404) and len(answer.content) < 2000


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(st.one_of(tool_bodies.map(lambda b: ("/v1/chat/completions", b)),
                 prompt_lists.map(lambda b: ("/v1/completions", b)),
                 responses_bodies.map(lambda b: ("/v1/responses", b))))
def test_new_request_shapes_over_the_server_get_an_answer_or_a_4xx_never_a_500(fuzz_server: Any,
                                                                                 case: tuple[str, Any]) -> None:
    """Tools, formats, tool history, logit_bias, prompt lists and Responses bodies, prepared for real (templates
    rendered, grammars compiled): a result or an OpenAI-shaped 4xx."""
    server, crashes = fuzz_server
    path, body = case
    if isinstance(body, dict):
        body = {**body, "max_tokens": 1, "max_output_tokens": 1, "stream": False} if path != "/v1/responses" else \
            {**body, "max_output_tokens": 1, "stream": False}
    answer = httpx.post(server.url + path, content=json.dumps(body), timeout=60,
                        headers={"Content-Type": "application/json"})
    assert answer.status_code in (200, 400, 404), (body, answer.text)
    data = answer.json()
    if answer.status_code == 200:
        assert data.get("choices") or data.get("output"), data
    else:
        assert set(data["error"]) == {"message", "type", "param", "code"} and data["error"]["message"]
    assert not crashes.records
