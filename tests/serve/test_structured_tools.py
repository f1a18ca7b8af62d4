"""Structured output, tool calls, logit_bias, prompt lists and model aliases over the live server, with the
real openai client: tiny-phi3 (the generic tool format) and the Phi-4-mini tools fixture (its own format)."""

from __future__ import annotations

import json
from typing import Any, Literal

import httpx
import pytest
from helpers import ADD, WEATHER
from serve_helpers import API_KEY, MODEL_NAME, LiveServer

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
pydantic = pytest.importorskip("pydantic")

TOOLS = [WEATHER, ADD]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                           "pet": {"enum": ["cat", "dog", "none"]}},
          "required": ["name", "age", "pet"], "additionalProperties": False}


class Person(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    name: str = pydantic.Field(max_length=10)
    age: int = pydantic.Field(ge=0, le=120)
    pet: Literal["cat", "dog", "none"]


@pytest.fixture()
def phi4(phi4_server: LiveServer) -> Any:
    return openai.OpenAI(base_url=f"{phi4_server.url}/v1", api_key="none", max_retries=0, timeout=120)


def check_calls(message: Any, names: set[str]) -> list[Any]:
    assert message.tool_calls
    for call in message.tool_calls:
        assert call.id.startswith("call_") and call.type == "function"
        assert call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    return message.tool_calls


def streamed_calls(stream: Any) -> tuple[str, dict[int, dict[str, Any]], str | None]:
    """Content, calls by index (id, name, concatenated arguments) and the finish reason of a chat stream;
    checks that each call's first delta carries its id and name."""
    content, calls, finish = "", {}, None
    for chunk in stream:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for delta in choice.delta.tool_calls or ():
                if delta.index not in calls:
                    assert delta.id and delta.id.startswith("call_") and delta.function.name
                    calls[delta.index] = {"id": delta.id, "name": delta.function.name, "arguments": ""}
                else:
                    assert delta.id is None
                calls[delta.index]["arguments"] += delta.function.arguments or ""
            finish = choice.finish_reason or finish
    return content, calls, finish


# -- response_format ----------------------------------------------------------------------------------
def test_parse_with_a_pydantic_model_gives_the_parsed_object(client: Any) -> None:
    completion = client.chat.completions.parse(model=MODEL_NAME, messages=[{"role": "user", "content": "Who?"}],
                                               response_format=Person, max_tokens=120, temperature=0)
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, Person)
    assert Person.model_validate_json(choice.message.content) == choice.message.parsed


def test_json_schema_at_temperature_1_is_valid_for_every_seed_streamed_or_not(client: Any) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    for seed in range(8):
        reply = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}],
                                               response_format=fmt, temperature=1, seed=seed, max_tokens=120)
        assert reply.choices[0].finish_reason == "stop", seed
        jsonschema.validate(json.loads(reply.choices[0].message.content), PERSON)
    for seed in range(3):
        stream = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}],
                                                response_format=fmt, temperature=1, seed=seed, max_tokens=120,
                                                stream=True)
        text, calls, finish = streamed_calls(stream)
        assert finish == "stop" and not calls
        jsonschema.validate(json.loads(text), PERSON)


def test_json_object_regex_and_lark_formats_are_enforced(client: Any) -> None:
    ask = [{"role": "user", "content": "Hi"}]
    reply = client.chat.completions.create(model=MODEL_NAME, messages=ask, max_tokens=60, temperature=1, seed=3,
                                           response_format={"type": "json_object"})
    if reply.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(reply.choices[0].message.content), dict)
    else:  # a random model may keep an object open; what came is still a JSON object's start
        assert reply.choices[0].finish_reason == "length" and reply.choices[0].message.content.startswith("{")
    reply = client.chat.completions.create(model=MODEL_NAME, messages=ask, max_tokens=20, temperature=1, seed=1,
                                           extra_body={"response_format": {"type": "regex",
                                                                           "regex": r"[0-9]{3}-[a-c]{2}"}})
    import re

    assert re.fullmatch(r"[0-9]{3}-[a-c]{2}", reply.choices[0].message.content)
    reply = client.chat.completions.create(model=MODEL_NAME, messages=ask, max_tokens=20, temperature=1, seed=2,
                                           extra_body={"response_format": {"type": "lark",
                                                                           "lark": 'start: "yes" | "no"'}})
    assert reply.choices[0].message.content in ("yes", "no")
    assert reply.choices[0].finish_reason == "stop"


def test_a_schema_the_runtime_cannot_enforce_is_a_400_naming_the_keyword(client: Any) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True},
                                                  "strict": True}}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL_NAME, messages=ASK, response_format=fmt, max_tokens=5)
    assert caught.value.status_code == 400
    assert caught.value.body["param"] == "response_format"
    assert "uniqueItems" in caught.value.body["message"]
    with pytest.raises(openai.BadRequestError) as caught:  # a format without its field
        client.chat.completions.create(model=MODEL_NAME, messages=ASK, max_tokens=5,
                                       response_format={"type": "json_schema"})
    assert caught.value.body["param"] == "response_format"
    # the server keeps serving
    assert client.chat.completions.create(model=MODEL_NAME, messages=ASK, max_tokens=2).choices


def test_a_structured_reply_cut_by_max_tokens_says_length(client: Any) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    reply = client.chat.completions.create(model=MODEL_NAME, messages=ASK, response_format=fmt, max_tokens=3,
                                           temperature=0)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 3
    assert reply.choices[0].message.content.startswith("{")


# -- tools ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["phi4", "tiny"])
def test_required_and_named_tool_calls_streamed_and_not(which: str, phi4: Any, client: Any) -> None:
    api, model = (phi4, "phi4") if which == "phi4" else (client, MODEL_NAME)
    # tiny-phi3's 512-token slots leave no room for a random model's 8 parallel calls
    parallel, budget = (True, 400) if which == "phi4" else (False, 120)
    for seed in range(3):
        reply = api.chat.completions.create(model=model, messages=ASK, tools=TOOLS, tool_choice="required",
                                            temperature=1, seed=seed, max_tokens=budget,
                                            parallel_tool_calls=parallel)
        assert reply.choices[0].finish_reason == "tool_calls"
        check_calls(reply.choices[0].message, {"get_weather", "add"})
    named = {"type": "function", "function": {"name": "add"}}
    reply = api.chat.completions.create(model=model, messages=ASK, tools=TOOLS, tool_choice=named, temperature=1,
                                        seed=5, max_tokens=120, parallel_tool_calls=False)
    calls = check_calls(reply.choices[0].message, {"add"})
    assert len(calls) == 1
    stream = api.chat.completions.create(model=model, messages=ASK, tools=TOOLS, tool_choice=named, temperature=1,
                                         seed=6, max_tokens=120, stream=True)
    content, streamed, finish = streamed_calls(stream)
    assert finish == "tool_calls" and streamed and not content
    for call in streamed.values():
        assert call["name"] == "add"
        jsonschema.validate(json.loads(call["arguments"]), SCHEMAS["add"])


@pytest.mark.parametrize("which", ["phi4", "tiny"])
def test_auto_gives_text_or_valid_calls_and_none_gives_text(which: str, phi4: Any, client: Any) -> None:
    api, model = (phi4, "phi4") if which == "phi4" else (client, MODEL_NAME)
    for seed in range(3):
        reply = api.chat.completions.create(model=model, messages=ASK, tools=TOOLS, tool_choice="auto",
                                            temperature=1, seed=seed, max_tokens=60)
        choice = reply.choices[0]
        if choice.finish_reason == "tool_calls":
            check_calls(choice.message, {"get_weather", "add"})
        else:
            assert choice.message.tool_calls is None and choice.finish_reason in ("stop", "length")
        _, calls, finish = streamed_calls(api.chat.completions.create(
            model=model, messages=ASK, tools=TOOLS, temperature=1, seed=seed, max_tokens=60, stream=True))
        assert (finish == "tool_calls") == bool(calls)
        for call in calls.values():
            jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])
    reply = api.chat.completions.create(model=model, messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=8)
    assert reply.choices[0].message.tool_calls is None and reply.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("which", ["phi4", "tiny"])
def test_the_round_trip_with_a_tool_message(which: str, phi4: Any, client: Any) -> None:
    api, model = (phi4, "phi4") if which == "phi4" else (client, MODEL_NAME)
    first = api.chat.completions.create(model=model, messages=ASK, tools=TOOLS, tool_choice="required", seed=1,
                                        temperature=1, max_tokens=120, parallel_tool_calls=False)
    calls = check_calls(first.choices[0].message, {"get_weather", "add"})
    history = [*ASK, first.choices[0].message.model_dump(exclude_none=True)]
    history += [{"role": "tool", "tool_call_id": c.id, "content": json.dumps({"temperature": 21})} for c in calls]
    second = api.chat.completions.create(model=model, messages=history, tools=TOOLS, tool_choice="none",
                                         max_tokens=10, temperature=0)
    assert second.choices[0].finish_reason in ("stop", "length")
    alone = api.chat.completions.create(model=model, messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=1)
    assert second.usage.prompt_tokens > alone.usage.prompt_tokens + 10  # the call and its result were rendered
    # the result is in the prompt: a different result renders a different prompt
    other = [*history[:-len(calls)], *({**m, "content": "other"} for m in history[-len(calls):])]
    third = api.chat.completions.create(model=model, messages=other, tools=TOOLS, tool_choice="none",
                                        max_tokens=1, temperature=0, extra_body={"return_token_ids": True})
    assert third.usage.prompt_tokens != second.usage.prompt_tokens
    with pytest.raises(openai.BadRequestError) as caught:  # a tool message must say which call it answers
        api.chat.completions.create(model=model, messages=[*ASK, {"role": "tool", "content": "x"}], max_tokens=2)
    assert caught.value.body["param"] == "messages.1"


def test_legacy_functions_are_read_as_tools(client: Any) -> None:
    functions = [t["function"] for t in TOOLS]
    reply = client.chat.completions.create(model=MODEL_NAME, messages=ASK, functions=functions,
                                           function_call={"name": "get_weather"}, max_tokens=120, seed=2,
                                           parallel_tool_calls=False,
                                           temperature=1)
    calls = check_calls(reply.choices[0].message, {"get_weather"})
    assert calls and reply.choices[0].finish_reason == "tool_calls"


def test_bad_tools_are_400s_naming_them(client: Any) -> None:
    cases = [({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
             ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
             ({"tool_choice": "required"}, "tool_choice"),
             # a regex (or Lark) format cannot be the answer beside calls; a bad schema is a 400 whatever the choice
             ({"tools": TOOLS, "response_format": {"type": "regex", "regex": "[a-z]+"}}, "response_format"),
             ({"tools": TOOLS, "tool_choice": "required", "response_format": {
                 "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array",
                                                                               "uniqueItems": True}}}},
              "response_format"),
             ({"tools": [{"type": "web_search"}]}, "tools.0.type")]
    for extra, param in cases:
        response = httpx.post(f"{client.base_url}chat/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                              json={"model": MODEL_NAME, "messages": ASK, "max_tokens": 4, **extra}, timeout=60)
        assert response.status_code == 400, extra
        error = response.json()["error"]
        assert error["param"] == param, (extra, error)
        assert error["message"] and "Traceback" not in response.text
    # with tool_choice "none" the tools are not offered and the format applies
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    reply = client.chat.completions.create(model=MODEL_NAME, messages=ASK, tools=TOOLS, tool_choice="none",
                                           response_format=fmt, max_tokens=120, temperature=1, seed=4)
    jsonschema.validate(json.loads(reply.choices[0].message.content), PERSON)


# -- response_format with tools -------------------------------------------------------------------------
class AddArgs(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    a: int = pydantic.Field(ge=-99, le=99)
    b: int = pydantic.Field(ge=-99, le=99)


class Pet(pydantic.BaseModel):
    """A short answer: tiny-phi3's 512-token slots hold the generic prompt, the tool and this schema."""
    model_config = pydantic.ConfigDict(extra="forbid")
    pet: Literal["cat", "dog"]


def check_call_or_answer(choice: Any, names: set[str]) -> str:
    """A reply to tools + response_format (auto): valid calls (finish "tool_calls") or content valid against
    PERSON (finish "stop"); which of the two."""
    if choice.finish_reason == "tool_calls":
        check_calls(choice.message, names)
        assert not choice.message.content
        return "call"
    assert choice.finish_reason == "stop" and choice.message.tool_calls is None, choice
    jsonschema.validate(json.loads(choice.message.content), PERSON)
    return "answer"


@pytest.mark.parametrize("which", ["phi4", "tiny"])
def test_auto_with_a_response_format_gives_a_valid_call_or_valid_content(which: str, phi4: Any, client: Any
                                                                          ) -> None:
    api, model = (phi4, "phi4") if which == "phi4" else (client, MODEL_NAME)
    # tiny-phi3's 512-token slots: one tool (the generic prompt lists the tools and the answer's schema)
    tools, budget = (TOOLS, 300) if which == "phi4" else ([ADD], 100)
    names = {t["function"]["name"] for t in tools}
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    seen = set()
    for seed in range(5):
        reply = api.chat.completions.create(model=model, messages=ASK, tools=tools, response_format=fmt,
                                            temperature=1, seed=seed, max_tokens=budget, parallel_tool_calls=False)
        seen.add(check_call_or_answer(reply.choices[0], names))
        content, calls, finish = streamed_calls(api.chat.completions.create(
            model=model, messages=ASK, tools=tools, tool_choice="auto", response_format=fmt, temperature=1,
            seed=seed, max_tokens=budget, parallel_tool_calls=False, stream=True))
        if calls:
            assert finish == "tool_calls" and not content
            for call in calls.values():
                jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])
        else:
            assert finish == "stop"
            jsonschema.validate(json.loads(content), PERSON)
    if which == "tiny":
        assert seen == {"call", "answer"}, seen  # the random model takes both branches over these seeds
    # tool_choice "required" with a format: the reply is a call (the format is for a reply in text)
    reply = api.chat.completions.create(model=model, messages=ASK, tools=tools, tool_choice="required",
                                        response_format=fmt, temperature=1, seed=1, max_tokens=budget,
                                        parallel_tool_calls=False)
    assert reply.choices[0].finish_reason == "tool_calls"
    check_calls(reply.choices[0].message, names)


@pytest.mark.parametrize("which", ["phi4", "tiny"])
def test_parse_with_a_pydantic_model_and_tools(which: str, phi4: Any, client: Any) -> None:
    """The openai SDK's parse(response_format=Model, tools=[...]): a parsed answer or parsed call arguments."""
    api, model = (phi4, "phi4") if which == "phi4" else (client, MODEL_NAME)
    budget = 300 if which == "phi4" else 50
    tool = openai.pydantic_function_tool(AddArgs, name="add")
    seen = set()
    for seed in range(4):
        completion = api.chat.completions.parse(model=model, messages=ASK, response_format=Pet, tools=[tool],
                                                temperature=1, seed=seed, max_tokens=budget,
                                                parallel_tool_calls=False)
        choice = completion.choices[0]
        if choice.finish_reason == "tool_calls":
            (call,) = choice.message.tool_calls
            assert call.function.name == "add" and isinstance(call.function.parsed_arguments, AddArgs)
            assert choice.message.parsed is None
            seen.add("call")
        else:
            assert choice.finish_reason == "stop" and isinstance(choice.message.parsed, Pet)
            assert Pet.model_validate_json(choice.message.content) == choice.message.parsed
            seen.add("answer")
    assert seen


def test_responses_text_format_with_a_tool_gives_a_call_or_a_schema_answer(client: Any, phi4: Any) -> None:
    tool = {"type": "function", "name": "add", "description": "Add.", "parameters": SCHEMAS["add"], "strict": True}
    text = {"format": {"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}}
    for api, model, budget in ((client, MODEL_NAME, 100), (phi4, "phi4", 300)):
        for seed in range(3):
            response = api.responses.create(model=model, input="Add 2 and 3", tools=[tool], text=text,
                                            parallel_tool_calls=False, max_output_tokens=budget, temperature=1,
                                            extra_body={"seed": seed})
            assert response.status == "completed"
            calls = [item for item in response.output if item.type == "function_call"]
            if calls:
                assert [c.name for c in calls] == ["add"] and not response.output_text
                jsonschema.validate(json.loads(calls[0].arguments), SCHEMAS["add"])
            else:
                jsonschema.validate(json.loads(response.output_text), PERSON)
        with api.responses.stream(model=model, input="Add 2 and 3", tools=[tool], text=text, temperature=1,
                                  parallel_tool_calls=False, max_output_tokens=budget,
                                  extra_body={"seed": 7}) as stream:
            final = stream.get_final_response()
        calls = [item for item in final.output if item.type == "function_call"]
        if calls:
            jsonschema.validate(json.loads(calls[0].arguments), SCHEMAS["add"])
        else:
            jsonschema.validate(json.loads(final.output_text), PERSON)


def test_every_format_with_every_tool_choice_is_answered_or_a_400(client: Any) -> None:
    """Each response_format × tool_choice combination: a reply or an OpenAI-shaped 400 on response_format,
    never a 500; and the server keeps serving."""
    formats = [{"type": "text"}, {"type": "json_object"},
               {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}},
               {"type": "json_schema", "json_schema": {"name": "u", "strict": False,
                                                       "schema": {"type": "array", "uniqueItems": True}}},
               {"type": "json_schema", "json_schema": {"name": "u", "schema": {"type": "array", "uniqueItems": True}}},
               {"type": "json_schema", "json_schema": {"name": "r", "schema": {"$ref": "#/nope"}}},
               {"type": "regex", "regex": "[a-z]{2}"}, {"type": "lark", "lark": 'start: "yes"'}]
    choices = ["auto", "required", {"type": "function", "function": {"name": "add"}}, "none"]
    for fmt in formats:
        for choice in choices:
            response = httpx.post(f"{client.base_url}chat/completions", timeout=60,
                                  headers={"Authorization": f"Bearer {API_KEY}"},
                                  json={"model": MODEL_NAME, "messages": ASK, "max_tokens": 4, "tools": [ADD],
                                        "tool_choice": choice, "response_format": fmt})
            assert response.status_code in (200, 400), (fmt, choice, response.text)
            if response.status_code == 400:
                assert response.json()["error"]["param"] == "response_format", (fmt, choice, response.text)
            # refused: a schema that cannot be enforced (strict), and regex/lark where a call may come
            unenforceable = fmt.get("json_schema", {}).get("strict") is not False and \
                fmt.get("json_schema", {}).get("name") in ("u", "r")
            assert (response.status_code == 400) == (unenforceable or (fmt["type"] in ("regex", "lark")
                                                                       and choice == "auto")), (fmt, choice)
    assert client.chat.completions.create(model=MODEL_NAME, messages=ASK, max_tokens=2).choices


# -- logit_bias, prompt lists, models ------------------------------------------------------------------
def test_logit_bias_is_honoured_on_chat_and_completions(client: Any, tiny_model: Any) -> None:
    plain = client.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=4, temperature=0,
                                      extra_body={"return_token_ids": True})
    first = plain.choices[0].token_ids[0]
    favoured = (first + 7) % tiny_model.folder.vocab_size
    biased = client.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=4, temperature=0,
                                       logit_bias={str(favoured): 100}, extra_body={"return_token_ids": True})
    assert biased.choices[0].token_ids == [favoured] * 4
    banned = client.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=4, temperature=0,
                                       logit_bias={str(first): -100}, extra_body={"return_token_ids": True})
    assert first not in banned.choices[0].token_ids
    chat = client.chat.completions.create(model=MODEL_NAME, messages=ASK, max_tokens=3, temperature=0,
                                          logit_bias={str(favoured): 100}, extra_body={"return_token_ids": True})
    assert chat.choices[0].token_ids == [favoured] * 3
    for bias, words in (({"x": 1}, "not a token id"), ({"5": 101}, "100"),
                        ({str(tiny_model.folder.vocab_size): 1}, "outside")):
        with pytest.raises(openai.BadRequestError) as caught:
            client.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=2, logit_bias=bias)
        assert caught.value.body["param"] == "logit_bias" and words in caught.value.body["message"]


def test_a_list_of_prompts_gives_one_choice_each_equal_to_solo_requests(client: Any) -> None:
    prompts = ["Hello there", "The sky is", "One two"]
    solo = [client.completions.create(model=MODEL_NAME, prompt=p, max_tokens=6, temperature=0).choices[0].text
            for p in prompts]
    batch = client.completions.create(model=MODEL_NAME, prompt=prompts, max_tokens=6, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1, 2]
    assert [c.text for c in batch.choices] == solo
    assert batch.usage.completion_tokens == sum(len(client.completions.create(
        model=MODEL_NAME, prompt=p, max_tokens=6, temperature=0, extra_body={"return_token_ids": True}
    ).choices[0].token_ids) for p in prompts)
    texts: dict[int, str] = {}
    finishes = {}
    for chunk in client.completions.create(model=MODEL_NAME, prompt=prompts, max_tokens=6, temperature=0,
                                           stream=True):
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert [texts[i] for i in range(3)] == solo and set(finishes) == {0, 1, 2}
    ids = client.completions.create(model=MODEL_NAME, prompt=[[5, 6, 7], [8, 9]], max_tokens=2, temperature=0)
    assert [c.index for c in ids.choices] == [0, 1] and ids.usage.prompt_tokens == 5
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL_NAME, prompt=["a", [1, 2]], max_tokens=2)
    assert "mixes" in caught.value.body["message"]


def test_models_by_id_and_aliases(phi4: Any, phi4_server: LiveServer) -> None:
    assert [m.id for m in phi4.models.list()] == ["phi4", "phi4-alias", "p4"]
    assert phi4.models.retrieve("p4").id == "p4"
    with pytest.raises(openai.NotFoundError) as caught:
        phi4.models.retrieve("gpt-4o")
    assert caught.value.body["code"] == "model_not_found" and "phi4-alias" in caught.value.body["message"]
    for name in ("phi4", "phi4-alias", "p4"):
        reply = phi4.chat.completions.create(model=name, messages=ASK, max_tokens=2)
        assert reply.model == name
    with pytest.raises(openai.NotFoundError):
        phi4.chat.completions.create(model="gpt-4o", messages=ASK, max_tokens=2)


def test_responses_stream_a_phi4_mini_tool_call_in_fragments(phi4: Any) -> None:
    """Phi-4-mini's calls stream as they are written: the item first, then argument fragments."""
    tool = {"type": "function", "name": "add", "description": "Add.", "parameters": SCHEMAS["add"]}
    with phi4.responses.stream(model="phi4", input="Add 2 and 3", tools=[tool], tool_choice="required",
                               parallel_tool_calls=False, max_output_tokens=200, temperature=0) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    added = kinds.index("response.output_item.added")
    assert events[added].item.type == "function_call" and events[added].item.name == "add"
    fragments = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert len(fragments) > 1 and "".join(fragments) == done.arguments
    jsonschema.validate(json.loads(done.arguments), SCHEMAS["add"])
    assert [i.type for i in final.output] == ["function_call"] and final.output[0].arguments == done.arguments


def test_a_bare_json_answer_naming_no_offered_tool_is_content_on_every_endpoint() -> None:
    from phi_onnx.runtime.scheduler import FinishEvent
    from phi_onnx.runtime.tools import PHI4_MINI
    from phi_onnx.serve.schema import ResponsesRequest
    from phi_onnx.serve.serving_chat import ChatResponseBuilder
    from phi_onnx.serve.serving_responses import ResponseObject

    person, call = '{"name": "Alice", "age": 3}', '{"name": "add", "arguments": {"a": 1, "b": 2}}'
    for text, called in ((person, False), (call, True)):
        finish = FinishEvent("eos", 5, 9, text)
        chat = ChatResponseBuilder(None, MODEL_NAME, None, False, PHI4_MINI, tool_names=("get_weather", "add"))
        whole = chat.whole_choice([], finish)
        assert (whole["message"]["content"], "tool_calls" in whole["message"]) == \
            ((None, True) if called else (person, False))
        streamed = chat.pieces(0, text[:7]) + chat.pieces(0, text[7:])
        held, has_calls = chat.ending(0)
        deltas = [piece["delta"] for piece in streamed + held]
        assert has_calls == called
        assert any("tool_calls" in d for d in deltas) == called
        assert "".join(d.get("content") or "" for d in deltas) == text  # a bare reply streams as text first
        body = ResponsesRequest.model_validate({"model": MODEL_NAME, "input": "hi"})
        output = ResponseObject(body, MODEL_NAME, PHI4_MINI, tool_names=("get_weather", "add")).whole(finish)["output"]
        assert [item["type"] for item in output] == (["function_call"] if called else ["message"])
