"""OpenAI request bodies (pydantic), what is done with each field OpenAI documents, and the OpenAI error shape.

Every request field OpenAI documents for chat completions, completions and responses is classified once, here,
in `CHAT_FIELDS`, `COMPLETION_FIELDS`, `MESSAGE_FIELDS`, `STREAM_OPTION_FIELDS` and `RESPONSES_FIELDS`: honoured
(tools, response_format and logit_bias included); refused (a 400
naming the field, unless its value asks for nothing, e.g. `modalities: ["text"]`); or ignored, where ignoring it
changes no output (`user`, `metadata`, `store`...). Fields OpenAI does not document are accepted, as
OpenAI's API and vLLM do (clients send vendor extras), and logged. Known fields with a wrong type or value
are a 400 naming the field. Extensions beyond OpenAI's API, as in vLLM: `top_k`, `repetition_penalty`
(transformers' multiplicative penalty), `min_tokens`, and `ignore_eos` (generate exactly max_tokens tokens,
for benchmarks); `{"type": "regex"}` and `{"type": "lark"}` response formats.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Annotated, Any, Literal, NamedTuple

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    field_validator,
    model_validator,
)

log = logging.getLogger(__name__)

MAX_STOPS = 4
#: Longest error message (ones quoting client input are cut there).
MAX_MESSAGE = 1000
#: Fields OpenAI's API documents as "or null" whose default here is not None: null means the default.
NULLABLE = frozenset({"stream", "n", "presence_penalty", "frequency_penalty", "logprobs", "include_usage", "echo",
                      "min_tokens", "ignore_eos", "parallel_tool_calls"})


class Policy(NamedTuple):
    """What phi-onnx does with one request field OpenAI documents."""

    action: Literal["honoured", "refused", "ignored"]
    #: Refused: what the field asks for (said in the 400). Ignored: why ignoring it changes no output.
    note: str = ""
    #: Refused: the values that ask for nothing and pass (null always does).
    allowed: tuple[Any, ...] = ()


_HONOURED = Policy("honoured")
_UNUSED = "nothing in the output depends on it"
#: Both endpoints' fields (OpenAI documents them for both).
_SAMPLING_FIELDS: dict[str, Policy] = {
    "model": _HONOURED, "max_tokens": _HONOURED, "temperature": _HONOURED, "top_p": _HONOURED, "seed": _HONOURED,
    "stop": _HONOURED, "stream": _HONOURED, "stream_options": _HONOURED, "presence_penalty": _HONOURED,
    "frequency_penalty": _HONOURED, "logprobs": _HONOURED,
    "n": _HONOURED,  # 1 only (one choice per request): any other value is a 400 from the model's type
    "logit_bias": _HONOURED,  # {"token id": bias}; ids the vocabulary lacks or biases outside -100..100 are a 400
    "user": Policy("ignored", "an end-user id for OpenAI's abuse monitoring; " + _UNUSED),
}
#: POST /v1/chat/completions: every request field OpenAI documents, and what phi-onnx does with it.
CHAT_FIELDS: dict[str, Policy] = {
    **_SAMPLING_FIELDS,
    "messages": _HONOURED, "max_completion_tokens": _HONOURED, "top_logprobs": _HONOURED,
    # text, json_object, json_schema (strict or not); extensions: regex and lark (llguidance's Lark)
    "response_format": _HONOURED,
    "tools": _HONOURED,  # function tools (phi_onnx.runtime.tools: the model's own format or the generic one)
    "tool_choice": _HONOURED, "parallel_tool_calls": _HONOURED,
    # OpenAI's deprecated forms of tools and tool_choice, read as those (the reply still says tool_calls)
    "functions": _HONOURED, "function_call": _HONOURED,
    "modalities": Policy("refused", "output other than text", (["text"],)),
    "audio": Policy("refused", "audio output"),
    "prediction": Policy("refused", "predicted outputs"),
    "web_search_options": Policy("refused", "web search"),
    "reasoning_effort": Policy("refused", "a reasoning effort"),
    "verbosity": Policy("refused", "a verbosity level", ("medium",)),
    "service_tier": Policy("refused", "a service tier", ("auto", "default")),
    "metadata": Policy("ignored", "tags for OpenAI's dashboard; " + _UNUSED),
    "store": Policy("ignored", "keeps the answer in OpenAI's stored completions; " + _UNUSED),
    "safety_identifier": Policy("ignored", "an end-user id for OpenAI's abuse monitoring; " + _UNUSED),
    "prompt_cache_key": Policy("ignored", "a prompt-cache routing hint; " + _UNUSED),
    "prompt_cache_retention": Policy("ignored", "how long OpenAI keeps a prompt cache; " + _UNUSED),
}
#: POST /v1/completions: every request field OpenAI documents, and what phi-onnx does with it.
COMPLETION_FIELDS: dict[str, Policy] = {
    **_SAMPLING_FIELDS,
    "prompt": _HONOURED,  # one prompt: a string, a list of one string, or a list of token ids
    "best_of": Policy("refused", "several candidates per prompt", (1,)),
    "echo": Policy("refused", "the prompt echoed before the completion", (False,)),
    "suffix": Policy("refused", "text after the completion (insertion)", ("",)),
}
#: The fields of one chat message (OpenAI's system, developer, user, assistant, tool and function messages).
MESSAGE_FIELDS: dict[str, Policy] = {
    "role": _HONOURED,  # system, developer (as system), user, assistant, tool; function messages are a 400
    "content": _HONOURED,  # a string or text parts; image, audio and file parts are a 400 (the models read text)
    "name": Policy("ignored", "a participant's name; Phi's chat templates have no place for it"),
    "tool_calls": _HONOURED, "tool_call_id": _HONOURED,  # rendered in the history (phi_onnx.runtime.tools)
    "function_call": Policy("refused", "a deprecated function call in the history (send it as tool_calls)"),
    "audio": Policy("refused", "a reference to an earlier audio answer"),
    "refusal": Policy("refused", "an assistant's refusal message", ("",)),
}
#: stream_options' fields.
STREAM_OPTION_FIELDS: dict[str, Policy] = {
    "include_usage": _HONOURED,
    "include_obfuscation": Policy("ignored", "random padding in stream chunks; the content is the same"),
}
#: Beyond OpenAI's API, as in vLLM (honoured).
EXTENSIONS = frozenset({"top_k", "repetition_penalty", "min_tokens", "ignore_eos", "return_token_ids"})
#: Content part types OpenAI documents that carry something other than text.
MEDIA_PARTS = {"image_url": "an image", "input_audio": "audio", "file": "a file"}
_TOOL_ROLES = {"function": "deprecated function results (send them as role 'tool' with a tool_call_id)"}

#: How many undocumented field names are logged at INFO (each name once); past it, and for repeats, DEBUG.
_LOGGED_NAMES_MAX = 256
_logged_names: set[str] = set()


def _not_text(value: Any) -> Any:
    # Lax mode would read "5" as 5, "0.7" as 0.7 and true as 1; OpenAI's API rejects them, and a client
    # that sends one has a bug it should hear about.
    if isinstance(value, str | bytes | bool):
        long = not isinstance(value, bool) and len(value) > 40
        shown = repr(value[:40]) + "..." if long else repr(value)
        raise ValueError(f"Input should be a number, not {type(value).__name__} {shown}")
    return value


#: Numbers: an int field still takes 1.0 (lax), never "1".
Int = Annotated[int, BeforeValidator(_not_text)]
Float = Annotated[float, BeforeValidator(_not_text)]


class ApiError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} with `status`."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        if len(message) > MAX_MESSAGE:  # a message quoting client text must not echo megabytes back
            message = message[:MAX_MESSAGE] + "... (cut)"
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The JSON body OpenAI's clients parse."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def encoded(self) -> bytes:
        """`body()` as JSON bytes, for answers sent below FastAPI (ASGI middleware, the HTTP protocol)."""
        return json.dumps(self.body()).encode()


class _Body(BaseModel):
    # Lax, so 1.0 passes as an int; booleans are StrictBool: lax mode reads "no" or 0 as False, which would
    # silently answer stream="no"/"yes" in a shape the client did not ask for.
    model_config = ConfigDict(extra="ignore", strict=False)

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        # Clients (and OpenAI's own examples) send "stream": null and the like; OpenAI takes it as unset.
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None or k not in NULLABLE}
        return data


def _bias_keys(value: Any) -> Any:
    # OpenAI sends token ids as JSON object keys (strings); a key that is no id is named here.
    if isinstance(value, dict):
        for key in value:
            if not (isinstance(key, str) and key.strip().isdigit()):
                raise ValueError(f"the key {shown_key(key)} is not a token id (logit_bias maps token ids such as "
                                 '"50256" to biases in -100..100)')
    return value


def shown_key(key: Any) -> str:
    text = repr(key)
    return text if len(text) <= 40 else text[:40] + "..."


Bias = Annotated[dict[str, Annotated[Float, Field(ge=-100, le=100)]], BeforeValidator(_bias_keys)]


class StreamOptions(_Body):
    include_usage: StrictBool = False


class _Sampling(_Body):
    model: str | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: Annotated[Literal[1], BeforeValidator(_not_text)] = 1  # lax Literal[1] takes true
    temperature: Annotated[Float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[Float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[Int, Field(ge=0)] | None = None
    seed: Annotated[Int, Field(ge=0, lt=2**63)] | None = None
    stop: str | list[str] | None = None
    presence_penalty: Annotated[Float, Field(ge=-2, le=2)] = 0.0
    frequency_penalty: Annotated[Float, Field(ge=-2, le=2)] = 0.0
    repetition_penalty: Annotated[Float, Field(gt=0, le=10)] | None = None
    min_tokens: Annotated[Int, Field(ge=0)] = 0
    ignore_eos: StrictBool = False
    return_token_ids: StrictBool = False  # each choice (and streamed chunk) carries the generated ids
    max_tokens: Annotated[Int, Field(ge=1)] | None = None
    user: str | None = None
    logit_bias: Bias | None = None

    def stops(self) -> tuple[str, ...]:
        """The stop strings, checked (at most 4, none empty)."""
        stops = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if len(stops) > MAX_STOPS or any(not s for s in stops):
            raise ApiError(400, f"'stop' takes at most {MAX_STOPS} non-empty strings.", param="stop")
        return stops


class TextPart(_Body):
    type: Literal["text"]
    text: str


class FunctionCall(_Body):
    name: str
    arguments: str


class ToolCallItem(_Body):
    """A call in an assistant message of the history."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallItem] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        """The content as one string (text parts joined)."""
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""

    @model_validator(mode="after")
    def _tool_fields(self) -> ChatMessage:
        if self.tool_calls and self.role != "assistant":
            raise ValueError(f"tool_calls belong to assistant messages, not {self.role} ones")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id of the call it answers")
        return self

    def as_dict(self) -> dict[str, Any]:
        """The message as the chat template (and phi_onnx.runtime.tools) takes it; developer is system."""
        out: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.tool_calls:
            out["tool_calls"] = [{"id": c.id, "type": "function",
                                  "function": {"name": c.function.name, "arguments": c.function.arguments}}
                                 for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.name is not None and self.role == "tool":
            out["name"] = self.name
        return out


class FunctionSpec(_Body):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None

    def as_tool(self) -> dict[str, Any]:
        spec: dict[str, Any] = {"name": self.name, "description": self.description or ""}
        if self.parameters is not None:
            spec["parameters"] = self.parameters
        return {"type": "function", "function": spec}


class ToolSpec(_Body):
    type: Literal["function"]
    function: FunctionSpec


class JsonSchemaFormat(_Body):
    name: str | None = None
    description: str | None = None
    schema_: Annotated[dict[str, Any] | None, Field(alias="schema")] = None
    strict: StrictBool | None = None


class ResponseFormat(_Body):
    """OpenAI's response_format, and two extensions: {"type": "regex", "regex": PATTERN} and
    {"type": "lark", "lark": GRAMMAR} (llguidance's Lark dialect)."""

    type: Literal["text", "json_object", "json_schema", "regex", "lark"]
    json_schema: JsonSchemaFormat | None = None
    regex: str | None = None
    lark: str | None = None

    @model_validator(mode="after")
    def _has_its_field(self) -> ResponseFormat:
        if self.type in ("json_schema", "regex", "lark") and getattr(self, self.type) is None:
            raise ValueError(f"type '{self.type}' needs the '{self.type}' field")
        return self

    def constraint(self) -> dict[str, Any]:
        """The keyword arguments of `Model.options` this format asks for (none for text).

        A json_schema with `strict: false` is enforced leniently (what llguidance cannot enforce is
        left out, as OpenAI's non-strict mode only aims at the schema); strict or unsaid, a keyword that
        cannot be enforced is a 400 naming it.
        """
        if self.type == "json_object":
            return {"json_object": True}
        if self.type == "json_schema":
            assert self.json_schema is not None
            schema = self.json_schema.schema_ if self.json_schema.schema_ is not None else {}
            return {"json_schema": schema, "strict": self.json_schema.strict is not False}
        if self.type == "regex":
            return {"regex": self.regex}
        if self.type == "lark":
            return {"grammar": self.lark}
        return {}


class ChatRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[Int, Field(ge=1)] | None = None
    logprobs: StrictBool = False
    top_logprobs: Annotated[Int, Field(ge=0, le=20)] | None = None
    response_format: ResponseFormat | None = None
    tools: list[ToolSpec] | None = None
    tool_choice: Literal["none", "auto", "required"] | ToolChoice | None = None
    parallel_tool_calls: StrictBool = True
    functions: list[FunctionSpec] | None = None
    function_call: Literal["none", "auto"] | FunctionName | None = None

    def characters(self) -> int:
        """Characters of the messages' text, leading and trailing whitespace aside (a chat template may trim it)."""
        return sum(len(message.text().strip()) for message in self.messages)

    def tool_list(self) -> list[dict[str, Any]] | None:
        """`tools`, or the deprecated `functions` as tools; None when neither is given (or both are empty)."""
        if self.tools:
            return [{"type": "function", "function": t.function.as_tool()["function"]} for t in self.tools]
        if self.functions:
            return [f.as_tool() for f in self.functions]
        return None

    def choice(self) -> Any:
        """`tool_choice`, or the deprecated `function_call` read as it."""
        if self.tool_choice is not None:
            return self.tool_choice if isinstance(self.tool_choice, str) else \
                {"type": "function", "function": {"name": self.tool_choice.function.name}}
        if isinstance(self.function_call, FunctionName):
            return {"type": "function", "function": {"name": self.function_call.name}}
        return self.function_call

    @model_validator(mode="after")
    def _one_tool_field(self) -> ChatRequest:
        if self.tools and self.functions:
            raise ValueError("send tools or the deprecated functions, not both")
        return self


class FunctionName(_Body):
    name: str


class ToolChoice(_Body):
    type: Literal["function"]
    function: FunctionName


ChatRequest.model_rebuild()

#: Most prompts in one completion request (each is its own choice).
MAX_PROMPTS = 64


class CompletionRequest(_Sampling):
    prompt: str | Annotated[list[Annotated[Int, Field(ge=0)]], Field(min_length=1)] | \
        Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)] | \
        Annotated[list[Annotated[list[Annotated[Int, Field(ge=0)]], Field(min_length=1)]],
                  Field(min_length=1, max_length=MAX_PROMPTS)]
    max_tokens: Annotated[Int, Field(ge=1)] | None = 16  # OpenAI's default for completions
    logprobs: Annotated[Int, Field(ge=0, le=5)] | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, value: Any) -> Any:
        # Each wrong shape gets its own message: pydantic's union error reads the same for all of them.
        if not isinstance(value, list):
            return value
        if not value:
            raise ValueError("an empty list holds no prompt; send a string, a list of strings, or token ids")
        lists = [isinstance(item, list) for item in value]
        texts = [isinstance(item, str) for item in value]
        if len(value) > MAX_PROMPTS and (any(lists) or any(texts)):
            raise ValueError(f"this is {len(value)} prompts; one request takes at most {MAX_PROMPTS}")
        if (any(lists) and not all(lists)) or (any(texts) and not all(texts)):
            raise ValueError("mixes prompt kinds: send strings, token ids, or lists of token ids")
        for number, item in enumerate(value):
            for index, token in enumerate(item if isinstance(item, list) else [item]):
                if isinstance(token, int | float) and not isinstance(token, bool) and token < 0:
                    where = f"item {number}.{index}" if isinstance(item, list) else f"item {index}"
                    raise ValueError(f"{where} is {token}, and token ids are 0 or more")
        return value

    def prompts(self) -> list[str | list[int]]:
        """The prompts: each a string or token ids."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if isinstance(self.prompt[0], int | float):
            return [list(self.prompt)]  # type: ignore[arg-type]
        return list(self.prompt)  # type: ignore[arg-type]


def _same(value: Any, allowed: tuple[Any, ...]) -> bool:
    # Type-strict: 0 == False and 1 == True in Python, but "echo": 0 is not "echo": false.
    return any(type(value) is type(a) and value == a for a in allowed)


def _refused(name: str, policy: Policy, param: str) -> ApiError:
    passes = " or ".join(["null", *(json.dumps(a) for a in policy.allowed)])
    return ApiError(400, f"Unsupported parameter: '{param}' asks for {policy.note}, which phi-onnx does not do "
                         f"(leave it out; {passes} is accepted).", param=param, code="unsupported_parameter")


def _log_undocumented(names: list[str], where: str) -> None:
    for name in names:
        shown = ascii(name[:64])  # the client chose it: no control characters or megabytes in the log
        if name in _logged_names or len(_logged_names) >= _LOGGED_NAMES_MAX:
            log.debug("ignored the field %s in %s: OpenAI does not document it", shown, where)
        else:
            _logged_names.add(name)
            log.info("ignored the field %s in %s: OpenAI does not document it (said once; again at DEBUG)",
                     shown, where)


def _check_fields(data: dict[str, Any], table: dict[str, Policy], where: str, prefix: str = "") -> None:
    """A 400 for the first refused field that asks for something; undocumented fields are logged."""
    undocumented = []
    for name, value in data.items():
        policy = table.get(name)
        if policy is None:
            if name not in EXTENSIONS:
                undocumented.append(name)
        elif policy.action == "refused" and value is not None and not _same(value, policy.allowed):
            raise _refused(name, policy, prefix + name)
    if undocumented:
        _log_undocumented(undocumented, where)


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list):
        return  # the model's validation names the type error
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            continue
        at = f"messages.{index}"
        role = message.get("role")
        if isinstance(role, str) and role in _TOOL_ROLES:
            raise ApiError(400, f"Unsupported parameter: '{at}.role' is '{role}': {_TOOL_ROLES[role]} are not "
                           "taken.", param=f"{at}.role", code="unsupported_parameter")
        _check_fields(message, MESSAGE_FIELDS, "a chat message", at + ".")
        content = message.get("content")
        for number, part in enumerate(content if isinstance(content, list) else ()):
            kind = part.get("type") if isinstance(part, dict) else None
            if isinstance(kind, str) and kind in MEDIA_PARTS:
                raise ApiError(400, f"'{at}.content.{number}' is {MEDIA_PARTS[kind]} (type '{kind}'), and this model "
                               "takes text only: send text parts or a string.",
                               param=f"{at}.content.{number}", code="unsupported_value")
            if kind == "refusal":
                raise _refused(f"{at}.content.{number}", MESSAGE_FIELDS["refusal"], f"{at}.content.{number}")


def parse(kind: type[_Sampling], data: Any) -> Any:
    """Validate a decoded JSON body; a ValidationError becomes a 400 naming the first bad field.

    Fields OpenAI documents that phi-onnx cannot honour are checked first (400 `unsupported_parameter`).
    """
    if not isinstance(data, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    chat = kind is ChatRequest
    _check_fields(data, CHAT_FIELDS if chat else COMPLETION_FIELDS,
                  "a chat completion request" if chat else "a completion request")
    if isinstance(data.get("stream_options"), dict):
        _check_fields(data["stream_options"], STREAM_OPTION_FIELDS, "stream_options", "stream_options.")
    if chat:
        _check_messages(data.get("messages"))
    try:
        return kind.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        # Union members add their type names to the location; keep only the field path.
        path = [str(p) for p in first["loc"] if isinstance(p, int) or p in _FIELDS]
        param = ".".join(path) or None
        message = first["msg"].removeprefix("Value error, ")
        raise ApiError(400, f"Invalid value for '{param}': {message}.", param=param,
                       code="invalid_value" if first["type"] != "missing" else "missing_required_parameter") \
            from None


_FIELDS = set().union(*(kind.model_fields for kind in (
    ChatRequest, CompletionRequest, ChatMessage, TextPart, StreamOptions, ToolCallItem, FunctionCall, FunctionSpec,
    ToolSpec, ResponseFormat, FunctionName, ToolChoice))) | {"schema"}

#: A JSON escape of a UTF-16 surrogate: the only way a lone surrogate gets into a decoded UTF-8 body.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _not_a_number(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def load_json(data: bytes) -> Any:
    """Decode a request body as strict JSON (UTF-8, no NaN or Infinity, Unicode strings); else a 400 saying why."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ApiError(400, f"The request body is not UTF-8 (byte {error.start}: {error.reason}); send JSON as "
                       "UTF-8.", code="invalid_json") from None
    try:
        value = json.loads(text, parse_constant=_not_a_number)
    except RecursionError:
        raise ApiError(400, "The request body's arrays and objects are nested too deeply to decode.",
                       code="invalid_json") from None
    except ValueError as error:  # JSONDecodeError, NaN/Infinity, Python's 4300-digit limit on integers
        reason = str(error)
        if "integer string conversion" in reason:
            reason = "an integer has more than 4300 digits"
        raise ApiError(400, f"The request body is not valid JSON ({reason}).", code="invalid_json") from None
    if _SURROGATE_ESCAPE.search(text):  # rare, so the walk below costs nothing for ordinary bodies
        where = _lone_surrogate(value)
        if where is not None:
            raise ApiError(400, f"The request body has a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape) "
                           f"in {where}; that is not Unicode text.", code="invalid_json")
    return value


def _lone_surrogate(value: Any) -> str | None:
    """Where the first string holding a lone surrogate is ('messages.0.content', or a key), or None.

    Iterative, so any depth json.loads accepted is fine.
    """
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return f"'{path}'" if path else "the body"
        elif isinstance(item, dict):
            for key, child in item.items():
                if _SURROGATE.search(key):
                    return f"a key of '{path}'" if path else "a key of the body"
                stack.append((child, f"{path}.{key}" if path else key))
        elif isinstance(item, list):
            stack.extend((child, f"{path}.{i}" if path else str(i)) for i, child in enumerate(item))
    return None


def check_api_key(key: str | None) -> None:
    """Refuse an API key no HTTP client can send: headers carry visible ASCII (no spaces or control characters)."""
    from phi_onnx.errors import OptionsError

    if key and not all("!" <= c <= "~" for c in key):
        bad = next(c for c in key if not "!" <= c <= "~")
        raise OptionsError(f"The API key holds {bad!a}, which an HTTP header cannot carry, so no client could "
                           "send it and every request would get 401.",
                           hint="Use visible ASCII characters only (letters, digits, punctuation; no spaces), "
                                "e.g. the output of `openssl rand -hex 32`.")


# -- the Responses API (POST /v1/responses) --------------------------------------------------------
#: POST /v1/responses: every request field OpenAI documents, and what phi-onnx does with it. The server is
#: stateless: nothing is stored, so what refers to an earlier response or a stored conversation is a 400.
RESPONSES_FIELDS: dict[str, Policy] = {
    "model": _HONOURED, "input": _HONOURED, "instructions": _HONOURED, "tools": _HONOURED,  # function tools
    "tool_choice": _HONOURED, "parallel_tool_calls": _HONOURED, "max_output_tokens": _HONOURED,
    "temperature": _HONOURED, "top_p": _HONOURED, "stream": _HONOURED,
    "text": _HONOURED,  # format: text, json_object, json_schema (and the regex / lark extensions)
    "store": Policy("refused", "the response kept for later retrieval, and phi-onnx keeps no state", (False,)),
    "previous_response_id": Policy("refused", "an earlier response's conversation, and phi-onnx keeps no state "
                                   "(send the whole conversation in 'input')"),
    "conversation": Policy("refused", "a stored conversation, and phi-onnx keeps no state (send the whole "
                           "conversation in 'input')"),
    "background": Policy("refused", "a response run in the background", (False,)),
    "background_options": Policy("refused", "a response run in the background"),
    "include": Policy("refused", "extra output data (reasoning, sources, logprobs)", ([],)),
    "reasoning": Policy("refused", "reasoning settings"),
    "truncation": Policy("refused", "input dropped to fit the context", ("disabled",)),
    "prompt": Policy("refused", "a stored prompt template"),
    "top_logprobs": Policy("refused", "log probabilities in the Responses API (the chat endpoint gives them)", (0,)),
    "service_tier": Policy("refused", "a service tier", ("auto", "default")),
    "context_management": Policy("refused", "context compaction"),
    "moderation": Policy("refused", "moderated output"),
    "image": Policy("refused", "image settings"),
    "max_tool_calls": Policy("ignored", "a limit on built-in tool calls, and phi-onnx has no built-in tools"),
    "stream_options": Policy("ignored", "random padding in stream events; the content is the same"),
    "metadata": Policy("ignored", "tags for OpenAI's dashboard; " + _UNUSED),
    "user": Policy("ignored", "an end-user id for OpenAI's abuse monitoring; " + _UNUSED),
    "safety_identifier": Policy("ignored", "an end-user id for OpenAI's abuse monitoring; " + _UNUSED),
    "prompt_cache_key": Policy("ignored", "a prompt-cache routing hint; " + _UNUSED),
    "prompt_cache_retention": Policy("ignored", "how long OpenAI keeps a prompt cache; " + _UNUSED),
    "prompt_cache_options": Policy("ignored", "how long OpenAI keeps a prompt cache; " + _UNUSED),
    "access_programs": Policy("ignored", "OpenAI's access programs; " + _UNUSED),
}
#: Input item types that need state or tools phi-onnx does not have.
_STATEFUL_ITEMS = {"item_reference": "a stored item (phi-onnx keeps no state; send the item itself)",
                   "reasoning": "a reasoning item", "compaction": "a compacted context"}


class ResponsesTool(_Body):
    type: str
    name: str | None = None
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None

    @model_validator(mode="after")
    def _function(self) -> ResponsesTool:
        if self.type != "function":
            raise ValueError(f"tools of type '{shown_key(self.type)}' are OpenAI's built-in tools, which phi-onnx "
                             "does not have; send function tools")
        if not self.name:
            raise ValueError("a function tool needs a name")
        return self


class ResponsesToolChoice(_Body):
    type: Literal["function"]
    name: str


class TextFormat(_Body):
    type: Literal["text", "json_object", "json_schema", "regex", "lark"]
    name: str | None = None
    description: str | None = None
    schema_: Annotated[dict[str, Any] | None, Field(alias="schema")] = None
    strict: StrictBool | None = None
    regex: str | None = None
    lark: str | None = None

    def as_response_format(self) -> dict[str, Any]:
        """The chat endpoint's response_format for this format."""
        if self.type == "json_schema":
            if self.schema_ is None:
                raise ValueError("type 'json_schema' needs 'schema'")
            return {"type": "json_schema", "json_schema": {"name": self.name or "response", "schema": self.schema_,
                                                           "strict": self.strict}}
        if self.type in ("regex", "lark"):
            return {"type": self.type, self.type: getattr(self, self.type)}
        return {"type": self.type}


class TextConfig(_Body):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None

    @field_validator("verbosity")
    @classmethod
    def _medium(cls, value: Any) -> Any:
        if value not in (None, "medium"):
            raise ValueError("a verbosity level is not something phi-onnx does (leave it out, or send 'medium')")
        return value


class ResponsesRequest(_Body):
    model: str | None = None
    input: str | Annotated[list[dict[str, Any]], Field(min_length=1)]
    instructions: str | None = None
    tools: list[ResponsesTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | ResponsesToolChoice | None = None
    parallel_tool_calls: StrictBool = True
    text: TextConfig | None = None
    max_output_tokens: Annotated[Int, Field(ge=1)] | None = None
    temperature: Annotated[Float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[Float, Field(gt=0, le=1)] | None = None
    stream: StrictBool = False
    store: StrictBool | None = None
    # extensions, as on the other endpoints
    top_k: Annotated[Int, Field(ge=0)] | None = None
    seed: Annotated[Int, Field(ge=0, lt=2**63)] | None = None
    repetition_penalty: Annotated[Float, Field(gt=0, le=10)] | None = None

    def chat_body(self) -> dict[str, Any]:
        """The chat completion request this asks for (validated by `parse(ChatRequest, ...)`)."""
        messages: list[dict[str, Any]] = []
        if self.instructions:
            messages.append({"role": "developer", "content": self.instructions})
        items = [{"role": "user", "content": self.input}] if isinstance(self.input, str) else self.input
        for index, item in enumerate(items):
            _add_item(messages, item, f"input.{index}")
        body: dict[str, Any] = {"model": self.model, "messages": messages,
                                "parallel_tool_calls": self.parallel_tool_calls,
                                "max_completion_tokens": self.max_output_tokens, "temperature": self.temperature,
                                "top_p": self.top_p, "top_k": self.top_k, "seed": self.seed,
                                "repetition_penalty": self.repetition_penalty}
        if self.tools:
            body["tools"] = [{"type": "function", "function": {
                "name": t.name, "description": t.description or "",
                **({"parameters": t.parameters} if t.parameters is not None else {})}} for t in self.tools]
        if self.tool_choice is not None:
            body["tool_choice"] = self.tool_choice if isinstance(self.tool_choice, str) else \
                {"type": "function", "function": {"name": self.tool_choice.name}}
        if self.text is not None and self.text.format is not None:
            try:
                body["response_format"] = self.text.format.as_response_format()
            except ValueError as error:
                raise ApiError(400, f"Invalid value for 'text.format': {error}.", param="text.format",
                               code="invalid_value") from None
        return {k: v for k, v in body.items() if v is not None}


def _text_of(content: Any, at: str) -> str:
    """A Responses message's content (a string or input_text/output_text parts) as text; other parts a 400."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ApiError(400, f"Invalid value for '{at}.content': a string or a list of text parts.",
                       param=f"{at}.content", code="invalid_value")
    texts = []
    for number, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        where = f"{at}.content.{number}"
        if kind in ("input_text", "output_text", "text") and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind in ("input_image", "input_file", "input_audio"):
            raise ApiError(400, f"'{where}' is {kind.removeprefix('input_')} (type '{kind}'), and this model takes "
                           "text only: send input_text parts or a string.", param=where, code="unsupported_value")
        else:
            raise ApiError(400, f"Invalid value for '{where}': a text part is {{\"type\": \"input_text\", "
                           "\"text\": ...}.", param=where, code="invalid_value")
    return "".join(texts)


def _add_item(messages: list[dict[str, Any]], item: dict[str, Any], at: str) -> None:
    """One Responses input item appended to chat `messages` (function calls join the assistant turn)."""
    kind = item.get("type", "message")
    if not isinstance(kind, str):
        raise ApiError(400, f"Invalid value for '{at}.type': a string (message, function_call, function_call_output).",
                       param=f"{at}.type", code="invalid_value")
    if kind == "message":
        role = item.get("role")
        if role not in ("user", "assistant", "system", "developer"):
            raise ApiError(400, f"Invalid value for '{at}.role': one of user, assistant, system, developer.",
                           param=f"{at}.role", code="invalid_value")
        messages.append({"role": role, "content": _text_of(item.get("content"), at)})
    elif kind == "function_call":
        call_id, name, arguments = item.get("call_id"), item.get("name"), item.get("arguments")
        if not all(isinstance(v, str) and v for v in (call_id, name)) or not isinstance(arguments, str):
            raise ApiError(400, f"Invalid value for '{at}': a function_call item needs call_id, name and arguments "
                           "(a JSON string).", param=at, code="invalid_value")
        call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
        last = messages[-1] if messages else None
        if last is not None and last["role"] == "assistant":
            last.setdefault("tool_calls", []).append(call)
        else:
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
    elif kind == "function_call_output":
        call_id, output = item.get("call_id"), item.get("output")
        if not isinstance(call_id, str) or not call_id:
            raise ApiError(400, f"Invalid value for '{at}.call_id': the call_id of the function_call it answers.",
                           param=f"{at}.call_id", code="invalid_value")
        content = output if isinstance(output, str) else _text_of(output, at)
        messages.append({"role": "tool", "tool_call_id": call_id, "content": content})
    elif kind in _STATEFUL_ITEMS:
        raise ApiError(400, f"Unsupported parameter: '{at}' is {_STATEFUL_ITEMS[kind]}, which phi-onnx does not "
                       "take.", param=f"{at}.type", code="unsupported_parameter")
    else:
        raise ApiError(400, f"Unsupported parameter: '{at}' has type '{shown_key(kind)}'; phi-onnx takes message, "
                       "function_call and function_call_output items.", param=f"{at}.type",
                       code="unsupported_parameter")


def parse_responses(data: Any) -> ResponsesRequest:
    """Validate a decoded /v1/responses body (refused fields first, as `parse`); a 400 naming the first bad field."""
    if not isinstance(data, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    if data.get("previous_response_id") is not None:
        raise ApiError(400, "Unsupported parameter: 'previous_response_id': phi-onnx keeps no responses (it is "
                       "stateless); send the whole conversation in 'input' (earlier output items included).",
                       param="previous_response_id", code="unsupported_parameter")
    _check_fields(data, RESPONSES_FIELDS, "a responses request")
    try:
        return ResponsesRequest.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        names = _FIELDS | set(ResponsesRequest.model_fields) | set(TextConfig.model_fields) \
            | set(TextFormat.model_fields) | set(ResponsesTool.model_fields)
        path = [str(p) for p in first["loc"] if isinstance(p, int) or p in names]
        param = ".".join(path) or None
        message = first["msg"].removeprefix("Value error, ")
        raise ApiError(400, f"Invalid value for '{param}': {message}.", param=param,
                       code="invalid_value" if first["type"] != "missing" else "missing_required_parameter") \
            from None
