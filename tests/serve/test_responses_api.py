"""POST /v1/responses with the real openai client: text, a schema, a tool, streamed and not; stateless refusals."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from serve_helpers import API_KEY, MODEL_NAME

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}
ADD = {"type": "function", "name": "add", "description": "Add two integers.", "strict": True,
       "parameters": {"type": "object", "properties": {"a": {"type": "integer", "minimum": -99, "maximum": 99},
                                                       "b": {"type": "integer", "minimum": -99, "maximum": 99}},
                      "required": ["a", "b"], "additionalProperties": False}}


def test_text_equals_the_chat_endpoint_and_has_usage(client: Any) -> None:
    response = client.responses.create(model=MODEL_NAME, input="Hello", instructions="Be brief.",
                                       max_output_tokens=8, temperature=0)
    chat = client.chat.completions.create(model=MODEL_NAME, max_tokens=8, temperature=0,
                                          messages=[{"role": "developer", "content": "Be brief."},
                                                    {"role": "user", "content": "Hello"}])
    assert response.object == "response" and response.id.startswith("resp_")
    assert response.output_text == chat.choices[0].message.content
    assert response.output[0].type == "message" and response.output[0].content[0].type == "output_text"
    assert response.usage.input_tokens == chat.usage.prompt_tokens
    assert response.usage.output_tokens == chat.usage.completion_tokens
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens
    if chat.choices[0].finish_reason == "length":
        assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    else:
        assert response.status == "completed"
    items = client.responses.create(model=MODEL_NAME, max_output_tokens=8, temperature=0, instructions="Be brief.",
                                    input=[{"role": "user", "content": [{"type": "input_text", "text": "Hello"}]}])
    assert items.output_text == response.output_text


def test_a_schema_in_text_format_is_enforced(client: Any) -> None:
    for seed in range(4):
        response = client.responses.create(
            model=MODEL_NAME, input="Who?", temperature=1, max_output_tokens=120, extra_body={"seed": seed},
            text={"format": {"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}})
        assert response.status == "completed"
        jsonschema.validate(json.loads(response.output_text), PERSON)


def test_a_tool_call_and_the_round_trip_with_its_output(client: Any) -> None:
    response = client.responses.create(model=MODEL_NAME, input="Add 2 and 3", tools=[ADD], tool_choice="required",
                                       parallel_tool_calls=False, max_output_tokens=120, temperature=0)
    calls = [item for item in response.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "add" and calls[0].call_id.startswith("call_")
    jsonschema.validate(json.loads(calls[0].arguments), ADD["parameters"])
    follow = client.responses.create(
        model=MODEL_NAME, tools=[ADD], tool_choice="none", max_output_tokens=5, temperature=0,
        input=[{"role": "user", "content": "Add 2 and 3"},
               {"type": "function_call", "call_id": calls[0].call_id, "name": "add", "arguments": calls[0].arguments},
               {"type": "function_call_output", "call_id": calls[0].call_id, "output": "5"}])
    assert follow.output[0].type == "message"
    alone = client.responses.create(model=MODEL_NAME, input="Add 2 and 3", max_output_tokens=1)
    assert follow.usage.input_tokens > alone.usage.input_tokens + 10  # the call and its output were rendered
    named = client.responses.create(model=MODEL_NAME, input="Add", tools=[ADD], max_output_tokens=120,
                                    tool_choice={"type": "function", "name": "add"}, parallel_tool_calls=False)
    assert [item.name for item in named.output if item.type == "function_call"] == ["add"]


def test_streaming_text_gives_the_event_sequence_and_the_final_response(client: Any) -> None:
    with client.responses.stream(model=MODEL_NAME, input="Hello", max_output_tokens=6, temperature=0) as stream:
        events = list(stream)
    # cut by max_output_tokens, the stream ends in response.incomplete (as OpenAI's): the SDK's
    # get_final_response() is for completed responses only, so the last event carries it
    final = events[-1].response
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed" if final.status == "completed" else "response.incomplete"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    whole = client.responses.create(model=MODEL_NAME, input="Hello", max_output_tokens=6, temperature=0)
    assert deltas == final.output_text == whole.output_text
    assert final.usage.output_tokens == whole.usage.output_tokens


def test_streaming_a_tool_call_and_a_schema(client: Any) -> None:
    with client.responses.stream(model=MODEL_NAME, input="Add", tools=[ADD], tool_choice="required",
                                 parallel_tool_calls=False, max_output_tokens=120, temperature=0) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert "response.function_call_arguments.delta" in kinds and kinds[-1] == "response.completed"
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    jsonschema.validate(json.loads(done.arguments), ADD["parameters"])
    calls = [item for item in final.output if item.type == "function_call"]
    assert [c.arguments for c in calls] == [done.arguments]
    with client.responses.stream(model=MODEL_NAME, input="Who?", max_output_tokens=120, temperature=1,
                                 text={"format": {"type": "json_schema", "name": "p", "schema": PERSON}},
                                 extra_body={"seed": 1}) as stream:
        final = stream.get_final_response()
    jsonschema.validate(json.loads(final.output_text), PERSON)


@pytest.mark.parametrize(("extra", "param", "words"), [
    ({"previous_response_id": "resp_1"}, "previous_response_id", "stateless"),
    ({"store": True}, "store", "keeps no state"),
    ({"background": True}, "background", "background"),
    ({"tools": [{"type": "web_search"}]}, "tools.0", "built-in"),
    ({"input": [{"type": "item_reference", "id": "x"}]}, "input.0.type", "stored item"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}]},
     "input.0.content.0", "text only"),
    ({"input": [{"type": "function_call_output", "output": "5"}]}, "input.0.call_id", "call_id"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format", "schema"),
    ({"max_output_tokens": 0}, "max_output_tokens", "greater"),
])
def test_what_cannot_be_done_is_a_400_naming_it(live_server: Any, extra: dict[str, Any], param: str,
                                                words: str) -> None:
    body = {"model": MODEL_NAME, "input": "Hi", "max_output_tokens": 2, **extra}
    response = httpx.post(f"{live_server.url}/v1/responses", json=body, timeout=60,
                          headers={"Authorization": f"Bearer {API_KEY}"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"], error
    assert "Traceback" not in response.text


def test_responses_requests_are_counted_in_the_metrics(client: Any, live_server: Any) -> None:
    def count() -> float:
        page = httpx.get(f"{live_server.url}/metrics", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
        lines = [line for line in page.text.splitlines()
                 if line.startswith("phi_onnx_requests_total{") and 'endpoint="responses"' in line
                 and 'status="200"' in line]
        return sum(float(line.rsplit(" ", 1)[1]) for line in lines)

    before = count()
    client.responses.create(model=MODEL_NAME, input="Hi", max_output_tokens=1)
    assert count() == before + 1
