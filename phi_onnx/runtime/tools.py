"""Tool calls, the model's side: tools into the prompt, the reply constrained to valid calls, calls parsed.

Two formats, chosen per model by `tool_format(template source, tokenizer vocabulary)`:

- **phi4-mini** (Phi-4-mini, Phi-4-multimodal's text side: a template that reads `message['tools']`
  and a `<|tool_call|>` token): the tools go, as a JSON list of {"name", "description",
  "parameters"}, into the `tools` string **of the system message** (the template ignores a
  top-level `tools` variable); a system message is added when there is none. The model answers
  `<|tool_call|>[{"name": ..., "arguments": {...}}]<|/tool_call|>`. History: an assistant message
  with `tool_calls` is rendered as its content followed by that same block; a `role: "tool"` message
  as `<|tool_response|>{"tool_call_id": ..., "name": ..., "content": ...}<|end|>` (the template has no
  format for results; this uses the tokenizer's own `<|tool_response|>` token, through the template's
  generic `'<|' + role + '|>'` rendering).
- **generic** (Phi-3/3.5, Phi-4, Phi-2, anything else; as llama.cpp's generic handler): the tools
  are described in the system prompt (`GENERIC_INSTRUCTIONS` with the tools' JSON), and the reply is
  one JSON object: {"tool_calls": [{"name", "arguments"}, ...]} or, with tool_choice "auto",
  {"response": "text"}. History: an assistant message with `tool_calls` becomes the JSON object it
  would have produced; a `role: "tool"` message becomes a user message
  {"tool_response": {"tool_call_id", "name", "content"}} (every template takes user messages).

tool_choice: "none" (tools are not rendered, nothing is constrained), "auto" (phi4-mini: free text,
but once the model writes `<|tool_call|>` the rest is constrained to valid calls; generic: the JSON
object above), "required" (at least one valid call is forced), or {"type": "function", "function":
{"name": ...}} (a call of that tool is forced). A constrained reply holds at most MAX_PARALLEL_CALLS
calls, or one with `parallel_tool_calls=False`.

A response format (json_schema or json_object; `answer_schema`) with tools: "auto" makes the reply either
calls or a text answer valid against the format, one grammar from the first token (phi4-mini: the
`<|tool_call|>` block or the format's JSON; generic: {"tool_calls": [...]} or {"response": ANSWER}, the
system prompt saying ANSWER's schema, and the content is ANSWER's JSON text). "required" or a named tool:
the reply is a call, and the format applies to no part of it (it applies to the next reply in text).
"none": the format applies to the reply as without tools.

`parse_tool_calls(text, format)` turns a reply into (content, [ToolCall]); it also accepts what an
unconstrained model writes: the bare list without the tags, and "parameters" for "arguments".
`ToolCallStream` does the same incrementally for streamed text: content deltas, then per call (by
`index`) a delta with id and name first and argument fragments after.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from phi_onnx.runtime.errors import OptionsError

__all__ = ["GENERIC", "PHI4_MINI", "ReplyPlan", "ResponseFormatError", "Tool", "ToolCall", "ToolCallDelta",
           "ToolCallStream", "ToolPlan", "answer_schema", "check_tool_choice", "check_tools", "parse_tool_calls",
           "plan_reply", "plan_tools", "render_tool_messages", "tool_format", "uses_tools"]

PHI4_MINI = "phi4-mini"
GENERIC = "generic"
CALL_OPEN, CALL_CLOSE = "<|tool_call|>", "<|/tool_call|>"
RESPONSE_ROLE = "tool_response"
#: Most calls in one constrained reply (parallel_tool_calls): a bound, so that a sampled reply cannot
#: spend its whole budget adding calls.
MAX_PARALLEL_CALLS = 8

#: The system prompt of the generic protocol; {tools} is the tools' JSON list.
GENERIC_INSTRUCTIONS = (
    "You can call these tools (JSON Schema parameters):\n{tools}\n"
    "Answer with one JSON object: {{\"tool_calls\": [{{\"name\": TOOL NAME, \"arguments\": {{...}}}}]}} to call "
    "tools, or {{\"response\": YOUR ANSWER}} to answer directly. Tool results come back as "
    "{{\"tool_response\": {{...}}}}.")
#: Added to GENERIC_INSTRUCTIONS when a response format is combined with tools ({schema}: its JSON).
GENERIC_ANSWER_SCHEMA = "YOUR ANSWER is a JSON value valid against this JSON Schema: {schema}"

_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
TOOL_HINT = ('Pass tools=[{"type": "function", "function": {"name": "get_weather", "description": "...", '
             '"parameters": {"type": "object", "properties": {...}}}}].')


@dataclass(frozen=True)
class Tool:
    """A function the model may call: its name, description and JSON Schema for the arguments."""

    name: str
    description: str = ""
    parameters: Mapping[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})

    def spec(self) -> dict[str, Any]:
        """{"name", "description", "parameters"}: how the tool is shown to the model."""
        return {"name": self.name, "description": self.description, "parameters": dict(self.parameters)}


@dataclass(frozen=True)
class ToolCall:
    """One call the model made, OpenAI's shape: `to_openai()` gives {"id", "type", "function": {"name",
    "arguments"}} with `arguments` a JSON string."""

    id: str
    name: str
    arguments: str

    def to_openai(self) -> dict[str, Any]:
        """The call as an element of OpenAI's `message.tool_calls`."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ToolCallDelta:
    """A piece of a streamed call, OpenAI's `delta.tool_calls[i]`: the first piece of call `index` has
    its id and name, later ones argument fragments (`arguments`, to be concatenated)."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""

    def to_openai(self) -> dict[str, Any]:
        """The delta as an element of OpenAI's streamed `delta.tool_calls`."""
        out: dict[str, Any] = {"index": self.index}
        if self.id is not None:
            out.update(id=self.id, type="function")
        function: dict[str, Any] = {"arguments": self.arguments}
        if self.name is not None:
            function["name"] = self.name
        out["function"] = function
        return out


def new_call_id() -> str:
    """A fresh `call_...` id (24 random alphanumerics, as OpenAI's)."""
    return "call_" + secrets.token_hex(12)


# -- checking what a caller passes ---------------------------------------------------------------
def check_tools(tools: Any) -> list[Tool]:
    """OpenAI's `tools` ([{"type": "function", "function": {...}}], or the bare function dicts) as Tools;
    OptionsError naming the first bad one."""
    if not isinstance(tools, (list, tuple)) or not tools:
        raise OptionsError(f"tools must be a non-empty list (got {tools!r:.80}).", hint=TOOL_HINT)
    out: list[Tool] = []
    for i, item in enumerate(tools):
        if isinstance(item, Tool):
            out.append(item)
            continue
        if not isinstance(item, Mapping):
            raise OptionsError(f"tools[{i}] is {type(item).__name__}, not a tool object.", hint=TOOL_HINT)
        kind = item.get("type", "function")
        if kind != "function":
            raise OptionsError(f"tools[{i}] has type {kind!r}; only function tools are supported.", hint=TOOL_HINT)
        function = item.get("function", item)
        if not isinstance(function, Mapping):
            raise OptionsError(f"tools[{i}].function is not an object.", hint=TOOL_HINT)
        name = function.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise OptionsError(f"tools[{i}] has an invalid name {name!r} (1-64 letters, digits, _ . -).",
                               hint=TOOL_HINT)
        description = function.get("description") or ""
        parameters = function.get("parameters")
        if parameters is None:
            parameters = {"type": "object", "properties": {}}
        if not isinstance(description, str) or not isinstance(parameters, Mapping):
            raise OptionsError(f"tools[{i}] ({name}): description must be a string and parameters a JSON "
                               "Schema object.", hint=TOOL_HINT)
        if any(t.name == name for t in out):
            raise OptionsError(f"Two tools are named {name!r}.", hint="Give each tool its own name.")
        out.append(Tool(name, description, dict(parameters)))
    return out


def check_tool_choice(choice: Any, tools: Sequence[Tool]) -> str | Tool:
    """"none", "auto", "required", or the Tool a named choice ({"type": "function", "function": {"name"}}
    or the bare name) asks for; OptionsError otherwise."""
    if choice is None:
        return "auto"
    if choice in ("none", "auto", "required"):
        return str(choice)
    name = choice
    if isinstance(choice, Mapping):
        function = choice.get("function")
        name = function.get("name") if isinstance(function, Mapping) else choice.get("name")
    for tool in tools:
        if tool.name == name:
            return tool
    raise OptionsError(f"tool_choice {choice!r:.80} names no tool given in tools "
                       f"({', '.join(t.name for t in tools)}).",
                       hint='Use "none", "auto", "required" or {"type": "function", "function": {"name": ...}}.')


# -- which format a model speaks -----------------------------------------------------------------
def tool_format(template_source: str | None, vocabulary: Mapping[str, int] | Sequence[str]) -> str:
    """PHI4_MINI when the chat template reads the system message's `tools` and the tokenizer has
    `<|tool_call|>`, else GENERIC."""
    if template_source and CALL_OPEN in vocabulary and re.search(r"message\[['\"]tools['\"]\]|message\.tools",
                                                                    template_source):
        return PHI4_MINI
    return GENERIC


# -- the prompt ----------------------------------------------------------------------------------
def render_tool_messages(messages: Sequence[Mapping[str, Any]], tools: Sequence[Tool] | None, fmt: str
                         ) -> list[dict[str, Any]]:
    """`messages` rewritten for a template that knows no tool calls: tools into the system message,
    assistant `tool_calls` and `role: "tool"` results in the format's own text (see the module doc)."""
    out: list[dict[str, Any]] = []
    names: dict[str, str] = {}  # tool_call_id -> function name, to name the results
    for i, message in enumerate(messages):
        role = message.get("role")
        if role == "assistant" and message.get("tool_calls"):
            calls = _history_calls(message["tool_calls"], i)
            names.update({c["id"]: c["name"] for c in calls if c.get("id")})
            plain = [{"name": c["name"], "arguments": c["arguments"]} for c in calls]
            content = message.get("content") or ""
            if fmt == PHI4_MINI:
                text = f"{content}{CALL_OPEN}{json.dumps(plain, ensure_ascii=False)}{CALL_CLOSE}"
            else:
                text = json.dumps({"tool_calls": plain}, ensure_ascii=False)
            out.append({"role": "assistant", "content": text})
        elif role == "tool":
            call_id = message.get("tool_call_id")
            content = message.get("content")
            if isinstance(content, list):  # OpenAI content parts: the text ones
                content = "".join(p.get("text", "") for p in content if isinstance(p, Mapping))
            if not isinstance(content, str):
                raise OptionsError(f"Message {i} (tool) needs a string content (the tool's result).",
                                   hint='Pass {"role": "tool", "tool_call_id": "call_...", "content": "..."}.')
            result = {"tool_call_id": call_id, "name": message.get("name") or names.get(call_id or ""),
                      "content": content}
            result = {k: v for k, v in result.items() if v is not None}
            if fmt == PHI4_MINI:
                out.append({"role": RESPONSE_ROLE, "content": json.dumps(result, ensure_ascii=False)})
            else:
                out.append({"role": "user", "content": json.dumps({"tool_response": result}, ensure_ascii=False)})
        else:
            out.append({k: v for k, v in message.items() if k != "tool_calls"})
    if tools:
        listing = json.dumps([t.spec() for t in tools], ensure_ascii=False)
        if fmt == PHI4_MINI:
            if out and out[0].get("role") == "system":
                out[0] = {**out[0], "tools": listing}
            else:
                out.insert(0, {"role": "system", "content": "You are a helpful assistant with some tools.",
                               "tools": listing})
        else:
            note = GENERIC_INSTRUCTIONS.format(tools=listing)
            if out and out[0].get("role") == "system":
                out[0] = {**out[0], "content": f"{out[0].get('content') or ''}\n\n{note}".lstrip()}
            else:
                out.insert(0, {"role": "system", "content": note})
    return out


def _history_calls(calls: Any, index: int) -> list[dict[str, Any]]:
    """An assistant message's OpenAI `tool_calls` as [{"id", "name", "arguments" (parsed)}]."""
    hint = ('Use tool_calls=[{"id": "call_1", "type": "function", "function": {"name": "f", '
            '"arguments": "{\\"x\\": 1}"}}].')
    if not isinstance(calls, (list, tuple)):
        raise OptionsError(f"Message {index}'s tool_calls must be a list.", hint=hint)
    out = []
    for call in calls:
        function = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise OptionsError(f"Message {index} has a tool call without a function name.", hint=hint)
        arguments = function.get("arguments", "{}")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments or "{}")
            except ValueError as error:
                raise OptionsError(f"Message {index}: the arguments of {function['name']} are not JSON ({error}).",
                                   hint=hint) from error
        out.append({"id": call.get("id"), "name": function["name"], "arguments": arguments})
    return out


# -- the constraint ------------------------------------------------------------------------------
def _call_schema(tools: Sequence[Tool]) -> dict[str, Any]:
    variants = [{"type": "object", "properties": {"name": {"const": t.name}, "arguments": dict(t.parameters)},
                 "required": ["name", "arguments"], "additionalProperties": False} for t in tools]
    return variants[0] if len(variants) == 1 else {"anyOf": variants}


def _calls_schema(tools: Sequence[Tool], parallel: bool) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "array", "items": _call_schema(tools), "minItems": 1,
                              "maxItems": MAX_PARALLEL_CALLS if parallel else 1}
    return schema


def _lark_json(schema: Mapping[str, Any]) -> str:
    from phi_onnx.runtime.grammar import JSON_LAYOUT

    return "%json " + json.dumps({**schema, "x-guidance": JSON_LAYOUT})


@dataclass
class ToolPlan:
    """What a chat with tools needs: the messages to render, the constraint (or a switching processor)
    for the reply, and the format to parse it with.

    Attributes:
        format: PHI4_MINI or GENERIC.
        messages: the messages for the chat template.
        constraint: a grammar the whole reply must match (None: unconstrained, or `switch`).
        switch: phi4-mini "auto": a Constraint applied once the model opens a call (after CALL_OPEN).
        tools: the tools offered.
        structured: the reply's text answer (not a call) is structured output (a response format was
            combined with tool_choice "auto"); parse the reply with `structured=True`.
    """

    format: str
    messages: list[dict[str, Any]]
    constraint: Any = None
    switch: Any = None
    tools: list[Tool] = field(default_factory=list)
    structured: bool = False

    @property
    def names(self) -> tuple[str, ...]:
        """The names of the tools offered (parse_tool_calls' and ToolCallStream's `names`)."""
        return tuple(tool.name for tool in self.tools)


def answer_schema(*, json_schema: Any = None, json_object: bool = False, regex: str | None = None,
                  grammar: Any = None, strict: bool = True) -> tuple[dict[str, Any], bool] | None:
    """The JSON schema a text answer must match when a response format (`Model.options`' constraint
    keywords) is combined with tools the model may call, and whether it is strict; None when no format
    is asked. The format is first checked on its own (`grammar.constraint_from`), so a bad schema is
    refused with the same message as without tools. A regex or Lark format cannot be combined with
    tools (the generic protocol's answer is JSON): OptionsError.
    """
    from phi_onnx.runtime import grammar as g

    if g.constraint_from(json_schema=json_schema, json_object=json_object, regex=regex, grammar=grammar,
                         strict=strict) is None:
        return None
    if regex is not None or grammar is not None:
        raise OptionsError(f"A {'regex' if regex is not None else 'Lark grammar'} response format cannot be "
                           "combined with tools the model may call (only json_schema and json_object can).",
                           hint='Use a json_schema response format, or tool_choice "none" (no calls) with it.')
    if json_schema is None:
        return {"type": "object"}, True
    schema = json.loads(json_schema) if isinstance(json_schema, str) else json_schema
    return ({} if schema is True else dict(schema)), strict


def _answer_json(schema: Mapping[str, Any], strict: bool) -> str:
    """`%json` of a response format's schema (non-strict: what llguidance cannot enforce is left out)."""
    from phi_onnx.runtime.grammar import JSON_LAYOUT

    layout = {**JSON_LAYOUT, **({} if strict else {"lenient": True})}
    return "%json " + json.dumps({**schema, "x-guidance": layout})


def plan_tools(messages: Sequence[Mapping[str, Any]], tools: Any, tool_choice: Any, fmt: str, *,
               parallel_tool_calls: bool = True, answer: tuple[Mapping[str, Any], bool] | None = None
               ) -> ToolPlan:
    """Messages and constraint for `tools` with `tool_choice` in format `fmt` (see the module doc).
    `tools` may be None (history with tool messages is still rendered).

    `answer` (from `answer_schema`): a response format's (schema, strict). With tool_choice "auto" the
    reply is then either calls or a text answer valid against the schema, one grammar for both
    (`structured` is set). With "required" or a named tool the reply is a call and the format applies to
    no part of it (it applies to a later text reply); with "none" (or no tools) the plan does not
    constrain the reply and the caller applies the format itself.
    """
    from phi_onnx.runtime import grammar

    checked = check_tools(tools) if tools is not None else []
    if not checked:
        if tool_choice not in (None, "none", "auto"):
            raise OptionsError(f"tool_choice {tool_choice!r:.60} needs tools.", hint=TOOL_HINT)
        return ToolPlan(fmt, render_tool_messages(messages, None, fmt))
    choice = check_tool_choice(tool_choice, checked)
    if choice == "none":
        return ToolPlan(fmt, render_tool_messages(messages, None, fmt), tools=checked)
    offered = [choice] if isinstance(choice, Tool) else checked
    calls = _calls_schema(offered, parallel_tool_calls)
    rendered = render_tool_messages(messages, checked, fmt)
    structured = choice == "auto" and answer is not None
    if fmt == PHI4_MINI:
        # Unquoted, llguidance's Lark names the token itself: llguidance treats every added token as
        # special (a quoted "<|tool_call|>" would have to be spelled in ordinary text tokens).
        block = f"{CALL_OPEN} calls {CALL_CLOSE}"
        if structured:
            assert answer is not None
            # calls, or (instead of free text) the response format's JSON: one grammar from the first token
            source = f"start: {block} | answer\ncalls: {_lark_json(calls)}\nanswer: {_answer_json(*answer)}\n"
            return ToolPlan(fmt, rendered, grammar.lark(source), tools=checked, structured=True)
        if choice == "auto":
            rest = grammar.lark(f"start: calls {CALL_CLOSE}\ncalls: {_lark_json(calls)}\n")
            return ToolPlan(fmt, rendered, switch=rest, tools=checked)
        return ToolPlan(fmt, rendered, grammar.lark(f"start: {block}\ncalls: {_lark_json(calls)}\n"), tools=checked)
    reply: dict[str, Any] = {"type": "object", "properties": {"tool_calls": calls}, "required": ["tool_calls"],
                             "additionalProperties": False}
    if structured:
        assert answer is not None
        schema, strict = answer
        rendered = _note_answer(rendered, schema)
        # {"tool_calls": [...]} or {"response": ANSWER}, ANSWER valid against the format's schema; two
        # %json alternatives, so that a non-strict format is lenient without making the tools' lenient
        answered = {"type": "object", "properties": {"response": dict(schema)}, "required": ["response"],
                    "additionalProperties": False}
        source = f"start: {_lark_json(reply)} | {_answer_json(answered, strict)}\n"
        return ToolPlan(fmt, rendered, grammar.lark(source), tools=checked, structured=True)
    if choice == "auto":
        reply = {"anyOf": [reply, {"type": "object", "properties": {"response": {"type": "string"}},
                                   "required": ["response"], "additionalProperties": False}]}
    return ToolPlan(fmt, rendered, grammar.json_schema(reply), tools=checked)


class ResponseFormatError(OptionsError):
    """The response format is invalid, or cannot go with the tools (a server answers it as `response_format`'s)."""


@dataclass(frozen=True)
class ReplyPlan:
    """What a chat reply runs under, tools or not (`plan_reply`).

    Attributes:
        messages: the messages for the chat template.
        constraint: a grammar the whole reply must match (tool calls, or calls or the format's answer).
        switch: phi4-mini "auto": a grammar applied once the model opens a call (`ToolCallSwitch`).
        asked: the response format's keywords that still apply to the reply, as without tools (a grammar
            the caller builds; empty when `constraint` or `switch` holds the format or the reply is a call).
        tool_format: the format to parse the reply's calls with (None: no call can come, the reply is text).
        structured: the reply's text answer is the response format's JSON (parse with `structured=True`).
        names: the tools offered (parse_tool_calls' and ToolCallStream's `names`).
    """

    messages: list[dict[str, Any]]
    constraint: Any = None
    switch: Any = None
    asked: dict[str, Any] = field(default_factory=dict)
    tool_format: str | None = None
    structured: bool = False
    names: tuple[str, ...] = ()


def uses_tools(messages: Any, tools: Any, tool_choice: Any) -> bool:
    """Whether a chat needs the tool format: tools offered, a tool_choice that asks for a call, or tool calls
    or results in the conversation (they need the format to render)."""
    return tools is not None or tool_choice not in (None, "none", "auto") or (
        isinstance(messages, (list, tuple)) and any(
            isinstance(m, Mapping) and (m.get("role") == "tool" or m.get("tool_calls")) for m in messages))


def plan_reply(messages: Sequence[Mapping[str, Any]], tools: Any, tool_choice: Any, asked: Mapping[str, Any], *,
               template_source: str | None, vocabulary: Mapping[str, int] | Sequence[str],
               parallel_tool_calls: bool = True) -> ReplyPlan:
    """How to run a chat reply with `tools`, `tool_choice` and a response format (`asked`: `Model.options`'
    constraint keywords), for the library's chat and the server's endpoints alike.

    Without tools, a tool_choice or tool history the messages are as given and `asked` applies as is. With
    them: the tool format of the template and vocabulary (`tool_format`), the plan of `plan_tools`, and the
    format combined as it says ("auto": calls or the format's answer, one grammar; "required" or a named
    tool: a call, the format checked and kept for a later text reply; "none": the format applies to the text).

    Raises:
        ResponseFormatError: the format is invalid or cannot go with the tools.
        OptionsError: the tools or tool_choice are invalid.
    """
    from phi_onnx.runtime.grammar import constraint_from

    if not uses_tools(messages, tools, tool_choice):
        return ReplyPlan(list(messages), asked=dict(asked))
    fmt: str | None = tool_format(template_source, vocabulary)
    assert fmt is not None
    answer = None
    if tools and any(v is not None and v is not False for k, v in asked.items() if k != "strict"):
        try:
            if tool_choice in (None, "auto"):
                answer = answer_schema(**asked)
            elif tool_choice != "none":
                constraint_from(**asked)  # still checked: a bad format is an error whatever the reply
        except OptionsError as error:
            raise ResponseFormatError(error.message, hint=error.hint) from None
    plan = plan_tools(messages, tools, tool_choice, fmt, parallel_tool_calls=parallel_tool_calls, answer=answer)
    holds = plan.constraint is not None or plan.switch is not None  # the format is in it, or the reply is a call
    if not plan.tools or tool_choice == "none":
        fmt = None  # history only: the reply is text (a JSON answer with a "name" is not a call)
    return ReplyPlan(plan.messages, plan.constraint, plan.switch, {} if holds else dict(asked), fmt,
                     plan.structured, plan.names)


def _note_answer(messages: list[dict[str, Any]], schema: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The generic protocol's system message (first: render_tool_messages put it there) told that a
    direct answer is JSON valid against `schema`."""
    note = GENERIC_ANSWER_SCHEMA.format(schema=json.dumps(schema, ensure_ascii=False))
    first = messages[0]
    return [{**first, "content": f"{first.get('content') or ''}\n{note}"}, *messages[1:]]


class ToolCallSwitch:
    """phi4-mini "auto" as a per-sequence logits processor: nothing is constrained until the model emits
    the `<|tool_call|>` token; from there the reply must be valid calls, `<|/tool_call|>`, then EOS."""

    def __init__(self, processor: Any, open_token: int) -> None:
        self.processor = processor  # a GrammarProcessor for what follows the open token
        self.open_token = open_token

    def for_sequence(self) -> _SequenceSwitch:
        """This sequence's own switch."""
        return _SequenceSwitch(self.processor, self.open_token)

    def __call__(self, token_ids: list[int], scores: np.ndarray) -> np.ndarray:
        raise RuntimeError("a ToolCallSwitch must be bound per sequence (bind_processors) before sampling")


class _SequenceSwitch:
    def __init__(self, processor: Any, open_token: int) -> None:
        self.processor = processor
        self.open_token = open_token
        self.start: int | None = None
        self.grammar: Any = None

    def __call__(self, token_ids: list[int], scores: np.ndarray) -> np.ndarray:
        grammar = self._grammar(token_ids)
        return scores if grammar is None else grammar(token_ids, scores)

    def forced_tokens(self, token_ids: Sequence[int]) -> list[int]:
        """What the calls' grammar forces once the model opened a call (fast-forward); [] before."""
        grammar = self._grammar(token_ids)
        return [] if grammar is None else grammar.forced_tokens(token_ids)

    def _grammar(self, token_ids: Sequence[int]) -> Any:
        """The calls' matcher, from the open token on (None while the reply is free text)."""
        if self.start is None:
            self.start = len(token_ids)
        if self.grammar is None:
            generated = list(token_ids[self.start:])
            if self.open_token not in generated:
                return None
            self.grammar = self.processor.for_sequence()
            self.grammar.advance(token_ids[: self.start + generated.index(self.open_token) + 1])
        return self.grammar


# -- parsing -------------------------------------------------------------------------------------
def _as_call(item: Any) -> ToolCall | None:
    if not isinstance(item, Mapping):
        return None
    function = item.get("function") if isinstance(item.get("function"), Mapping) else item
    name = function.get("name")
    arguments = function.get("arguments", function.get("parameters", {}))
    if not isinstance(name, str) or not name:
        return None
    if isinstance(arguments, str):
        try:
            json.loads(arguments)
        except ValueError:
            return None
    else:
        arguments = json.dumps(arguments, ensure_ascii=False)
    return ToolCall(new_call_id(), name, arguments)


def _calls_of(value: Any) -> list[ToolCall] | None:
    items = value if isinstance(value, list) else [value]
    calls = [_as_call(item) for item in items]
    if not calls or any(c is None for c in calls):
        return None
    return [c for c in calls if c is not None]


def parse_tool_calls(text: str, fmt: str, *, structured: bool = False,
                     names: Collection[str] | None = None) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of a reply. phi4-mini: `<|tool_call|>[...]<|/tool_call|>` blocks (the closing tag
    may be missing at the end), or a bare JSON list/object of calls as the whole reply; generic: the JSON
    object {"tool_calls": [...]} or {"response": "..."}. Text that is no call stays content.

    structured (a response format combined with tools, `ToolPlan.structured`): the answer is JSON, so a
    bare JSON object is content, never read as a call (phi4-mini), and the generic {"response": VALUE}
    gives VALUE's JSON text as content (a string VALUE stays JSON: the format may ask for one).

    names (the tools offered): a bare phi4-mini reply is read as calls only when each names one of them;
    without the tags, `{"name": "Alice", "age": 3}` is an answer, not a call to a tool "Alice"."""
    stripped = text.strip()
    if fmt == GENERIC:
        try:
            value = json.loads(stripped)
        except ValueError:
            value = None
        if isinstance(value, Mapping):
            if "response" in value and structured:
                return _raw_response(stripped, value["response"]), []
            if "response" in value and isinstance(value["response"], str):
                return value["response"], []
            found = _calls_of(value.get("tool_calls", value.get("tool_call")))
            if found:
                return None, found
    calls: list[ToolCall] = []
    content_parts: list[str] = []
    rest = text
    while CALL_OPEN in rest:
        before, _, after = rest.partition(CALL_OPEN)
        body, closed, rest = after.partition(CALL_CLOSE)
        found = _json_calls(body)
        if found is None:
            content_parts.append(before + CALL_OPEN + body + (CALL_CLOSE if closed else ""))
            continue
        content_parts.append(before)
        calls.extend(found)
    content_parts.append(rest)
    if not calls and not structured:
        found = _json_calls(stripped)  # a bare list (or object) with no tags
        if found and (names is None or all(call.name in names for call in found)):
            return None, found
    content = "".join(content_parts).strip()
    return (content or None) if calls else text, calls


_RESPONSE_HEAD = re.compile(r'\{\s*"response"\s*:')


def _raw_response(text: str, value: Any) -> str:
    """The JSON text of a generic {"response": VALUE} reply's VALUE, as the model wrote it when the object
    has only that key (the constrained case), else VALUE written again."""
    head = _RESPONSE_HEAD.match(text)
    if head is not None and text.endswith("}"):
        raw = text[head.end():-1].strip()
        try:
            if json.loads(raw) == value:
                return raw
        except ValueError:
            pass
    return json.dumps(value, ensure_ascii=False)


def _json_calls(body: str) -> list[ToolCall] | None:
    try:
        value = json.loads(body)
    except ValueError:
        return None
    return _calls_of(value)


class ToolCallStream:
    """Incremental parsing of a streamed reply: `push(piece)` yields content strings and ToolCallDeltas;
    `finish()` yields what is left and sets `calls` (the complete calls, as parse_tool_calls gives).

    phi4-mini: text before `<|tool_call|>` streams as content (a possible prefix of the tag is held
    back); inside a block, a call's id and name are sent as soon as its "name" is complete, then its
    arguments in fragments as they arrive. generic: the JSON object is held and parsed at the end
    (its `response` is then the content)."""

    def __init__(self, fmt: str, *, structured: bool = False, names: Collection[str] | None = None) -> None:
        self.format = fmt
        self.structured = structured  # as parse_tool_calls' flag
        self.names = names  # as parse_tool_calls' names
        self.text = ""
        self.shown = 0  # content characters of `text` sent
        self.calls: list[ToolCall] = []
        self._block: int | None = None  # where the open block's JSON starts in `text`
        self._sent: dict[int, tuple[str, str, int]] = {}  # index -> (id, name, argument chars sent)
        self._base = 0  # index of the current block's first call

    def push(self, piece: str) -> Iterator[str | ToolCallDelta]:
        """Add streamed text; yield what can be shown now."""
        self.text += piece
        if self.format == GENERIC:
            return
        while True:
            if self._block is None:
                at = self.text.find(CALL_OPEN, self.shown)
                if at < 0:
                    safe = len(self.text) - _partial_tag(self.text[self.shown:], CALL_OPEN)
                    if safe > self.shown:
                        yield self.text[self.shown:safe]
                        self.shown = safe
                    return
                if at > self.shown:
                    yield self.text[self.shown:at]
                self._block = at + len(CALL_OPEN)
                self.shown = self._block
            end = self.text.find(CALL_CLOSE, self._block)
            body = self.text[self._block: end if end >= 0 else len(self.text)]
            yield from self._deltas(body, final=end >= 0)
            if end < 0:
                return
            self._base = len(self._sent)
            self.shown = end + len(CALL_CLOSE)
            self._block = None

    def _deltas(self, body: str, *, final: bool) -> Iterator[ToolCallDelta]:
        for i, (name, arguments, complete) in enumerate(_partial_calls(body)):
            index = self._base + i
            if index not in self._sent:
                if name is None:
                    return
                call_id = new_call_id()
                self._sent[index] = (call_id, name, 0)
                yield ToolCallDelta(index, call_id, name)
            call_id, name, sent = self._sent[index]
            if arguments is not None:
                # arguments still open may end in a partial token: send them only when complete or final
                ready = arguments if (complete or final) else arguments[: _stable(arguments)]
                if len(ready) > sent:
                    yield ToolCallDelta(index, arguments=ready[sent:])
                    self._sent[index] = (call_id, name, len(ready))

    def finish(self) -> Iterator[str | ToolCallDelta]:
        """The end of the reply: everything held back, and `calls` set."""
        content, calls = parse_tool_calls(self.text, self.format, structured=self.structured, names=self.names)
        if self.format == GENERIC:
            if calls:
                for i, call in enumerate(calls):
                    yield ToolCallDelta(i, call.id, call.name)
                    yield ToolCallDelta(i, arguments=call.arguments)
            elif content:
                yield content
            self.calls = calls
            return
        if self._block is not None:
            yield from self._deltas(self.text[self._block:], final=True)
        elif self.shown < len(self.text):
            yield self.text[self.shown:]
            self.shown = len(self.text)
        if not self._sent and calls:  # a bare list without tags: known only now
            for i, call in enumerate(calls):
                self._sent[i] = (call.id, call.name, len(call.arguments))
                yield ToolCallDelta(i, call.id, call.name)
                yield ToolCallDelta(i, arguments=call.arguments)
        # the calls keep the ids their deltas were sent with
        self.calls = [ToolCall(self._sent[i][0], c.name, c.arguments) if i in self._sent else c
                      for i, c in enumerate(calls)]


def _partial_tag(tail: str, tag: str) -> int:
    """Length of the longest suffix of `tail` that is a proper prefix of `tag`."""
    for size in range(min(len(tail), len(tag) - 1), 0, -1):
        if tag.startswith(tail[-size:]):
            return size
    return 0


def _stable(arguments: str) -> int:
    """How much of an unfinished arguments text is safe to send (the whole of it: JSON fragments are
    concatenated by the client; only a trailing backslash could still change meaning)."""
    return len(arguments) - (1 if arguments.endswith("\\") else 0)


_CALL_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*')


def _partial_calls(body: str) -> list[tuple[str | None, str | None, bool]]:
    """The calls in a (possibly unfinished) JSON list body: (name, arguments text so far, complete)."""
    out: list[tuple[str | None, str | None, bool]] = []
    text = body.lstrip()
    if not text.startswith("["):
        return out
    pos = 1
    decoder = json.JSONDecoder()
    while pos < len(text):
        head = _CALL_HEAD.match(text, pos)
        if head is None:
            if re.match(r'\s*\{\s*"name"\s*:\s*"(?:[^"\\]|\\.)*"', text[pos:]) or \
                    re.match(r'\s*\{', text[pos:]):
                out.append((None, None, False))
            break
        name = json.loads(f'"{head.group(1)}"')
        start = head.end()
        try:
            _, end = decoder.raw_decode(text, start)
        except ValueError:
            out.append((name, text[start:], False))
            break
        out.append((name, text[start:end], True))
        rest = re.match(r"\s*\}\s*,?", text[end:])
        if rest is None:
            break
        pos = end + rest.end()
    return out
