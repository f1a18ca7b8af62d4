"""Tool calls, the model's side (runtime/tools.py): formats, constrained calls, parsing, streaming, history."""

from __future__ import annotations

import json
from typing import Any

import pytest
from helpers import ADD, PHI4_MINI_CHAT_TEMPLATE, WEATHER

from phi_onnx.errors import OptionsError
from phi_onnx.runtime import tools as T

jsonschema = pytest.importorskip("jsonschema")

SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, ADD)}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def phi4mini(phi4_mini_tools_export: Any) -> Any:
    import phi_onnx

    model = phi_onnx.load(phi4_mini_tools_export, device="cpu", backend="ort")
    yield model
    model.close()


def assert_valid_calls(calls: list[T.ToolCall], names: set[str]) -> None:
    assert calls
    for call in calls:
        assert call.id.startswith("call_") and len(call.id) > 10
        assert call.name in names
        jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
        shaped = call.to_openai()
        assert shaped["type"] == "function" and shaped["function"]["arguments"] == call.arguments


# -- the fixture is Phi-4-mini's format ---------------------------------------------------------
def test_the_fixture_has_phi4_minis_template_and_non_special_tool_tokens(phi4mini):
    assert phi4mini.chat_template.source == PHI4_MINI_CHAT_TEMPLATE
    assert T.tool_format(phi4mini.chat_template.source, phi4mini.tokenizer.vocabulary()) == T.PHI4_MINI
    opened = phi4mini.tokenizer.token_to_id("<|tool_call|>")
    assert phi4mini.encode("<|tool_call|>", add_special_tokens=False) == [opened]
    assert phi4mini.decode([opened]) == "<|tool_call|>"  # not special: kept in decoded text
    # the trap: a top-level `tools` variable renders nothing
    plain = phi4mini.chat_template.render(ASK)
    assert phi4mini.chat_template.render(ASK, tools=[WEATHER]) == plain


def test_phi4_mini_tools_go_on_the_system_message(phi4mini):
    plan = T.plan_tools(ASK, [WEATHER], "auto", T.PHI4_MINI)
    prompt = phi4mini.render_chat(plan.messages)
    listing = json.dumps([T.check_tools([WEATHER])[0].spec()])
    assert prompt.startswith(f"<|system|>You are a helpful assistant with some tools.<|tool|>{listing}<|/tool|><|end|>")
    assert prompt.endswith("<|user|>What is the weather in Paris?<|end|><|assistant|>")
    system = [{"role": "system", "content": "Be brief."}, *ASK]
    prompt = phi4mini.render_chat(T.plan_tools(system, [WEATHER], "auto", T.PHI4_MINI).messages)
    assert prompt.startswith("<|system|>Be brief.<|tool|>[{")


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "add"}}])
def test_required_and_named_always_give_valid_calls_at_temperature_one(phi4mini, choice):
    names = {"add"} if isinstance(choice, dict) else {"get_weather", "add"}
    for seed in range(10):
        result = phi4mini.chat(ASK, tools=[WEATHER, ADD], tool_choice=choice, temperature=1.0, seed=seed,
                               max_new_tokens=400)
        assert result.finish_reason == "tool_calls", result.text
        assert result.text.startswith("<|tool_call|>[") and result.text.endswith("]<|/tool_call|>")
        assert result.content is None
        assert_valid_calls(result.tool_calls, names)
        assert len(result.tool_calls) <= T.MAX_PARALLEL_CALLS


def test_parallel_tool_calls_false_gives_one_call(phi4mini):
    for seed in range(5):
        result = phi4mini.chat(ASK, tools=[WEATHER, ADD], tool_choice="required", parallel_tool_calls=False,
                               temperature=1.0, seed=seed, max_new_tokens=120)
        assert len(result.tool_calls) == 1


def test_auto_is_free_text_until_the_model_opens_a_call(phi4mini):
    switch = T.ToolCallSwitch(phi4mini.grammar(T.plan_tools(ASK, [ADD], "auto", T.PHI4_MINI).switch),
                              phi4mini.tokenizer.token_to_id("<|tool_call|>"))
    # A random model rarely opens a call by itself: push it with a bias on the token, then the rest is
    # constrained. Without the bias the reply is plain text (auto does not force a call).
    opened = phi4mini.tokenizer.token_to_id("<|tool_call|>")
    free = phi4mini.chat(ASK, tools=[ADD], tool_choice="auto", max_new_tokens=20)
    assert free.tool_calls == [] and free.content == free.text and free.finish_reason in ("eos", "length")
    for seed in range(6):
        result = phi4mini.chat(ASK, tools=[ADD], tool_choice="auto", temperature=1.0, seed=seed,
                               logit_bias={opened: 100}, max_new_tokens=400)
        assert result.finish_reason == "tool_calls", result.text
        assert_valid_calls(result.tool_calls, {"add"})
    assert switch.for_sequence() is not switch.for_sequence()


def test_history_with_tool_calls_and_results_round_trips(phi4mini):
    first = phi4mini.chat(ASK, tools=[WEATHER], tool_choice="required", temperature=1.0, seed=1, max_new_tokens=120)
    call = first.tool_calls[0]
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call.to_openai()]},
               {"role": "tool", "tool_call_id": call.id, "content": "18 C, sunny"}]
    rendered = T.render_tool_messages(history, None, T.PHI4_MINI)
    prompt = phi4mini.render_chat(rendered)
    assert f"<|assistant|><|tool_call|>[{{\"name\": \"get_weather\", \"arguments\": {call.arguments}}}]" \
           "<|/tool_call|><|end|>" in prompt
    assert ('<|tool_response|>{"tool_call_id": "' + call.id + '", "name": "get_weather", "content": "18 C, sunny"}'
            "<|end|><|assistant|>") in prompt
    reply = phi4mini.chat(history, tools=[WEATHER], tool_choice="none", max_new_tokens=8)
    assert reply.tool_calls == [] and reply.finish_reason in ("eos", "length")


def test_generic_protocol_on_a_model_without_a_tool_format(tiny):
    assert T.tool_format(tiny.chat_template.source, tiny.tokenizer.vocabulary()) == T.GENERIC
    plan = T.plan_tools(ASK, [WEATHER, ADD], "required", T.GENERIC)
    assert plan.messages[0]["role"] == "system" and '"get_weather"' in plan.messages[0]["content"]
    for seed in range(5):  # one reply may hold several calls (the slow case), the others one
        result = tiny.chat(ASK, tools=[WEATHER, ADD], tool_choice="required", temperature=1.0, seed=seed,
                           parallel_tool_calls=seed == 0, max_new_tokens=400)
        assert seed == 0 or len(result.tool_calls) == 1
        assert result.finish_reason == "tool_calls", result.text
        assert_valid_calls(result.tool_calls, {"get_weather", "add"})
    for seed in range(3):
        result = tiny.chat(ASK, tools=[ADD], tool_choice="auto", temperature=1.0, seed=seed, max_new_tokens=60)
        value = json.loads(result.text) if result.finish_reason != "length" else None
        if result.tool_calls:
            assert_valid_calls(result.tool_calls, {"add"})
        elif value is not None:
            assert result.content == value["response"]
    call = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a":1,"b":2}'}}
    history = [*ASK, {"role": "assistant", "tool_calls": [call]},
               {"role": "tool", "tool_call_id": "call_1", "content": "3"}]
    prompt = tiny.render_chat(T.render_tool_messages(history, None, T.GENERIC))
    assert '{"tool_calls": [{"name": "add", "arguments": {"a": 1, "b": 2}}]}' in prompt
    assert '{"tool_response": {"tool_call_id": "call_1", "name": "add", "content": "3"}}' in prompt
    assert tiny.chat(history, max_new_tokens=4).finish_reason in ("eos", "length")


# -- parsing -----------------------------------------------------------------------------------
def test_parse_phi4_mini_blocks_bare_lists_and_parameters():
    content, calls = T.parse_tool_calls('Sure. <|tool_call|>[{"name": "add", "arguments": {"a": 1, "b": 2}}]'
                                        '<|/tool_call|>', T.PHI4_MINI)
    assert content == "Sure." and [(c.name, json.loads(c.arguments)) for c in calls] == [("add", {"a": 1, "b": 2})]
    content, calls = T.parse_tool_calls('[{"name": "a", "parameters": {"x": [1, [2]]}}, {"name": "b", '
                                        '"arguments": "{}"}]', T.PHI4_MINI)
    assert content is None and [(c.name, c.arguments) for c in calls] == [("a", '{"x": [1, [2]]}'), ("b", "{}")]
    assert len({c.id for c in calls}) == 2
    text = "<|tool_call|>not json<|/tool_call|> plain"
    assert T.parse_tool_calls(text, T.PHI4_MINI) == (text, [])
    assert T.parse_tool_calls("just text", T.PHI4_MINI) == ("just text", [])
    _, unclosed = T.parse_tool_calls('<|tool_call|>[{"name": "f", "arguments": {}}]', T.PHI4_MINI)
    assert [c.name for c in unclosed] == ["f"]
    assert T.parse_tool_calls('{"response": "hi"}', T.GENERIC) == ("hi", [])
    _, generic = T.parse_tool_calls('{"tool_calls": [{"name": "f", "arguments": {"a": 1}}]}', T.GENERIC)
    assert [(c.name, c.arguments) for c in generic] == [("f", '{"a": 1}')]


def test_streaming_deltas_name_first_then_argument_fragments():
    text = ('Let me see.<|tool_call|>[{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}, '
            '{"name": "add", "arguments": {"a": 1, "b": [2, {"c": 3}]}}]<|/tool_call|>')
    stream = T.ToolCallStream(T.PHI4_MINI)
    out: list[Any] = []
    for i in range(0, len(text), 3):
        out.extend(stream.push(text[i:i + 3]))
    out.extend(stream.finish())
    content = "".join(x for x in out if isinstance(x, str))
    assert content == "Let me see."
    deltas = [x for x in out if isinstance(x, T.ToolCallDelta)]
    for index, name in ((0, "get_weather"), (1, "add")):
        mine = [d for d in deltas if d.index == index]
        assert mine[0].id and mine[0].id.startswith("call_") and mine[0].name == name and mine[0].arguments == ""
        assert all(d.id is None and d.name is None for d in mine[1:])
        assert len(mine) > 2  # arguments came in several fragments
        arguments = "".join(d.arguments for d in mine)
        assert json.loads(arguments) == json.loads(stream.calls[index].arguments)
        assert stream.calls[index].id == mine[0].id
        assert mine[0].to_openai() == {"index": index, "id": mine[0].id, "type": "function",
                                       "function": {"name": name, "arguments": ""}}
    # index 0 is fully sent before index 1 starts
    assert max(i for i, d in enumerate(deltas) if d.index == 0) < min(i for i, d in enumerate(deltas) if d.index == 1)
    plain = T.ToolCallStream(T.PHI4_MINI)
    shown = [x for piece in ["Hello <|tool", "_ca", "t|> world"] for x in plain.push(piece)] + list(plain.finish())
    assert "".join(shown) == "Hello <|tool_cat|> world" and plain.calls == []


def test_chat_stream_with_tools_streams_raw_pieces_and_finishes_with_calls(phi4mini):
    stream = phi4mini.chat_stream(ASK, tools=[ADD], tool_choice="required", temperature=1.0, seed=2,
                                  max_new_tokens=120)
    parser = T.ToolCallStream(stream.tool_format)
    deltas = [x for piece in stream for x in parser.push(piece)] + list(parser.finish())
    result = stream.result
    assert result is not None and result.finish_reason == "tool_calls"
    assert [c.name for c in parser.calls] == [c.name for c in result.tool_calls]
    streamed = "".join(d.arguments for d in deltas if isinstance(d, T.ToolCallDelta) and d.index == 0)
    assert json.loads(streamed) == json.loads(result.tool_calls[0].arguments)


def test_bad_tools_and_choices_are_refused():
    with pytest.raises(OptionsError, match="non-empty list"):
        T.check_tools({})
    with pytest.raises(OptionsError, match="invalid name"):
        T.check_tools([{"type": "function", "function": {"name": "has space"}}])
    with pytest.raises(OptionsError, match="only function tools"):
        T.check_tools([{"type": "web_search"}])
    with pytest.raises(OptionsError, match="Two tools"):
        T.check_tools([ADD, ADD])
    with pytest.raises(OptionsError, match="names no tool"):
        T.plan_tools(ASK, [ADD], {"type": "function", "function": {"name": "nope"}}, T.GENERIC)
    with pytest.raises(OptionsError, match="needs tools"):
        T.plan_tools(ASK, None, "required", T.GENERIC)
    with pytest.raises(OptionsError, match="uniqueItems"):
        T.plan_tools(ASK, [{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"x": {"type": "array", "uniqueItems": True}}}}}], "required", T.GENERIC)


def test_prepare_chat_runs_on_the_scheduler_as_a_server_would(phi4mini):
    from phi_onnx.runtime.scheduler import Scheduler

    scheduler = Scheduler(phi4mini, max_batch=4, max_queue=8)
    handles = []
    for seed, choice in enumerate(["required", {"type": "function", "function": {"name": "get_weather"}}] * 2):
        prepared = phi4mini.prepare_chat(ASK, tools=[WEATHER, ADD], tool_choice=choice, temperature=1.0,
                                         seed=seed, max_new_tokens=400)
        assert prepared.tool_format == T.PHI4_MINI and prepared.dropped == 0
        handles.append((choice, scheduler.submit(prepared.prompt_ids, prepared.options)))
    for _ in range(3000):
        if all(h.finish for _, h in handles):
            break
        scheduler.step()
    for choice, handle in handles:
        assert handle.finish.reason == "eos", handle.finish
        content, calls = T.parse_tool_calls(handle.finish.text, T.PHI4_MINI)
        assert content is None
        assert_valid_calls(calls, {"get_weather"} if isinstance(choice, dict) else {"get_weather", "add"})
    scheduler.close()


# -- a response format with tools (tool_choice "auto": calls or an answer in the format) ------------
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}


def assert_call_or_answer(result: Any, names: set[str], schema: dict[str, Any]) -> str:
    """Either valid calls (finish "tool_calls") or content valid against `schema` (finish "eos"); which."""
    if result.tool_calls:
        assert result.finish_reason == "tool_calls", result.text
        assert_valid_calls(result.tool_calls, names)
        return "call"
    assert result.finish_reason == "eos", result.text
    jsonschema.validate(json.loads(result.content), schema)
    return "answer"


def test_phi4_mini_auto_with_a_json_schema_gives_a_valid_call_or_a_valid_answer(phi4mini):
    opened = phi4mini.tokenizer.token_to_id("<|tool_call|>")
    seen = set()
    for seed in range(6):
        result = phi4mini.chat(ASK, tools=[WEATHER, ADD], json_schema=PERSON, temperature=1.0, seed=seed,
                               max_new_tokens=400)
        seen.add(assert_call_or_answer(result, {"get_weather", "add"}, PERSON))
    # each branch, pushed by a bias on the call token: the other side of the grammar is the format's JSON
    for bias, branch in ((100, "call"), (-100, "answer")):
        for seed in range(3):
            result = phi4mini.chat(ASK, tools=[WEATHER, ADD], tool_choice="auto", json_schema=PERSON,
                                   temperature=1.0, seed=seed, max_new_tokens=400, logit_bias={opened: bias})
            assert assert_call_or_answer(result, {"get_weather", "add"}, PERSON) == branch
            if branch == "answer":  # the answer is the whole reply, no call markup, parsed as content
                assert result.content == result.text and result.text.startswith("{")
    # the answer names a "name": it is content still, not read as a call of a tool by that name
    assert "name" in PERSON["properties"]
    stream = phi4mini.chat_stream(ASK, tools=[ADD], json_schema=PERSON, temperature=1.0, seed=1,
                                  max_new_tokens=200, logit_bias={opened: -100})
    assert stream.structured and stream.tool_format == T.PHI4_MINI
    parser = T.ToolCallStream(stream.tool_format, structured=stream.structured)
    shown = [x for piece in stream for x in parser.push(piece)] + list(parser.finish())
    assert stream.result is not None and stream.result.finish_reason == "eos" and parser.calls == []
    jsonschema.validate(json.loads("".join(shown)), PERSON)
    assert "".join(shown) == stream.result.content


def test_generic_auto_with_a_json_schema_gives_a_valid_call_or_a_valid_answer(tiny):
    plan = T.plan_tools(ASK, [ADD], "auto", T.GENERIC, answer=(PERSON, True))
    assert plan.structured and plan.constraint is not None
    assert json.dumps(PERSON) in plan.messages[0]["content"]  # the prompt says what an answer looks like
    seen = set()
    for seed in range(8):
        result = tiny.chat(ASK, tools=[WEATHER, ADD], json_schema=PERSON, temperature=1.0, seed=seed,
                           parallel_tool_calls=False, max_new_tokens=200)
        seen.add(assert_call_or_answer(result, {"get_weather", "add"}, PERSON))
        if not result.tool_calls:  # {"response": ANSWER}: content is ANSWER's JSON as written
            assert result.text == '{"response":' + result.content + "}"
    assert seen == {"call", "answer"}, seen  # a random model takes both branches over these seeds


def test_required_and_named_with_a_response_format_give_calls_and_regex_with_auto_is_refused(phi4mini, tiny):
    for model in (phi4mini, tiny):
        result = model.chat(ASK, tools=[ADD], tool_choice="required", json_schema=PERSON, temperature=1.0,
                            seed=3, parallel_tool_calls=False, max_new_tokens=200)
        assert result.finish_reason == "tool_calls"
        assert_valid_calls(result.tool_calls, {"add"})
        # tool_choice "none": no call can come, the format applies to the reply
        result = model.chat(ASK, tools=[ADD], tool_choice="none", json_schema=PERSON, temperature=1.0,
                            seed=3, max_new_tokens=200)
        assert result.tool_calls == [] and result.finish_reason == "eos"
        jsonschema.validate(json.loads(result.text), PERSON)
        with pytest.raises(OptionsError, match="regex response format cannot be combined with tools"):
            model.chat(ASK, tools=[ADD], regex="[a-z]+", max_new_tokens=4)
        with pytest.raises(OptionsError, match="uniqueItems"):  # the format is checked whatever the choice
            model.chat(ASK, tools=[ADD], tool_choice="required", max_new_tokens=4,
                       json_schema={"type": "array", "uniqueItems": True})


def test_parsing_a_structured_reply_reads_no_answer_as_a_call():
    answer = '{"name":"add","arguments":{"a":1}}'  # a JSON answer that looks like a bare call
    assert [c.name for c in T.parse_tool_calls(answer, T.PHI4_MINI)[1]] == ["add"]  # unconstrained: a call
    assert T.parse_tool_calls(answer, T.PHI4_MINI, structured=True) == (answer, [])
    content, calls = T.parse_tool_calls('<|tool_call|>[{"name":"add","arguments":{"a":1,"b":2}}]<|/tool_call|>',
                                        T.PHI4_MINI, structured=True)
    assert content is None and [(c.name, json.loads(c.arguments)) for c in calls] == [("add", {"a": 1, "b": 2})]
    # generic: {"response": VALUE} gives VALUE's JSON text, a string included (the format may ask for one)
    assert T.parse_tool_calls('{"response":{"name":"Bo","age":3}}', T.GENERIC, structured=True) == \
        ('{"name":"Bo","age":3}', [])
    assert T.parse_tool_calls('{"response":"hi"}', T.GENERIC, structured=True) == ('"hi"', [])
    assert T.parse_tool_calls('{"response":"hi"}', T.GENERIC) == ("hi", [])
    stream = T.ToolCallStream(T.GENERIC, structured=True)
    shown = [x for piece in ['{"resp', 'onse":{"a":', '[1]}}'] for x in stream.push(piece)] + list(stream.finish())
    assert shown == ['{"a":[1]}'] and stream.calls == []


def test_a_bare_json_reply_is_a_call_only_when_it_names_an_offered_tool():
    person = '{"name": "Alice", "age": 3}'  # an answer whose key happens to be "name"
    assert [c.name for c in T.parse_tool_calls(person, T.PHI4_MINI)[1]] == ["Alice"]  # names unknown: read as before
    assert T.parse_tool_calls(person, T.PHI4_MINI, names={"add"}) == (person, [])
    call = '[{"name": "add", "arguments": {"a": 1}}, {"name": "get_weather", "arguments": {}}]'
    assert [c.name for c in T.parse_tool_calls(call, T.PHI4_MINI, names={"add", "get_weather"})[1]] == \
        ["add", "get_weather"]
    assert T.parse_tool_calls(call, T.PHI4_MINI, names={"add"}) == (call, [])  # one unoffered name: all text
    # the tags say the model meant a call: kept whatever it names (the client sees the name it gave)
    tagged = f"<|tool_call|>{person}<|/tool_call|>"
    assert [c.name for c in T.parse_tool_calls(tagged, T.PHI4_MINI, names={"add"})[1]] == ["Alice"]
    stream = T.ToolCallStream(T.PHI4_MINI, names={"add"})
    shown = [x for piece in [person[:9], person[9:]] for x in stream.push(piece)] + list(stream.finish())
    assert "".join(x for x in shown if isinstance(x, str)) == person
    assert stream.calls == [] and not any(isinstance(x, T.ToolCallDelta) for x in shown)


def test_prepare_chat_and_its_stream_carry_the_offered_tool_names(phi4mini):
    prepared = phi4mini.prepare_chat(ASK, tools=[WEATHER, ADD], max_new_tokens=4)
    assert prepared.tool_format == T.PHI4_MINI and prepared.tool_names == ("get_weather", "add")
    stream = phi4mini.chat_stream(ASK, tools=[ADD], max_new_tokens=2)
    assert stream.tool_names == ("add",)
    stream.close()
    assert phi4mini.prepare_chat(ASK, max_new_tokens=4).tool_names == ()


def test_plan_reply_is_the_one_rule_for_tools_and_response_formats() -> None:
    """The library's prepare_chat and the server's chat/Responses endpoints both run plan_reply: without tools
    the format applies as is; "auto" folds it into the calls grammar; "required" checks it and keeps it for a
    later reply; "none" applies it to the text; a bad format is a ResponseFormatError (a 400 on
    response_format), bad tools an OptionsError."""
    vocab = {"<|tool_call|>": 1, "<|/tool_call|>": 2, "a": 3}
    source = PHI4_MINI_CHAT_TEMPLATE
    schema = {"json_schema": {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}}

    def plan(tools: Any, choice: Any, asked: dict[str, Any], messages: Any = ASK) -> T.ReplyPlan:
        return T.plan_reply(messages, tools, choice, asked, template_source=source, vocabulary=vocab)

    plain = plan(None, None, schema)
    assert plain.messages == ASK and plain.asked == schema and plain.tool_format is None
    assert plain.constraint is None and plain.switch is None and plain.names == ()
    auto = plan([WEATHER, ADD], "auto", schema)
    assert auto.constraint is not None and auto.structured and auto.asked == {}
    assert auto.tool_format == T.PHI4_MINI and auto.names == ("get_weather", "add")
    switch = plan([WEATHER], "auto", {})
    assert switch.switch is not None and switch.constraint is None and not switch.structured
    required = plan([WEATHER], "required", schema)
    assert required.constraint is not None and required.asked == {} and not required.structured
    none = plan([WEATHER], "none", schema)
    assert none.tool_format is None and none.asked == schema and none.names == ("get_weather",)
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    replay = plan(None, None, {}, history)
    assert replay.tool_format is None and replay.messages != history  # rendered in the tool format, reply is text
    with pytest.raises(T.ResponseFormatError, match="regex"):
        plan([WEATHER], "auto", {"regex": "[a-z]+"})  # the generic answer is JSON: no regex with tools
    with pytest.raises(T.ResponseFormatError):
        plan([WEATHER], "required", {"json_schema": {"type": "no-such-type"}})
    with pytest.raises(OptionsError) as bad_tools:
        plan([WEATHER], {"type": "function", "function": {"name": "missing"}}, {})
    assert not isinstance(bad_tools.value, T.ResponseFormatError)


def test_tool_call_switch_needs_the_call_token(phi4mini: Any, models: Any) -> None:
    from phi_onnx.runtime import grammar

    rest = grammar.lark('start: "x"\n')
    switch = phi4mini.tool_call_switch(rest)
    assert isinstance(switch, T.ToolCallSwitch) and switch.open_token == phi4mini.tokenizer.token_to_id(T.CALL_OPEN)
    with pytest.raises(OptionsError, match="tool_call"):
        models("phi3-gqa").tool_call_switch(rest)
