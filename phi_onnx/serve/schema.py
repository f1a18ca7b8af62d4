"""OpenAI request bodies (pydantic), what is done with each field OpenAI documents, and the OpenAI error shape.

Every request field OpenAI documents for chat completions and completions is classified once, here, in
`CHAT_FIELDS`, `COMPLETION_FIELDS`, `MESSAGE_FIELDS` and `STREAM_OPTION_FIELDS`: honoured; refused (a 400
naming the field, unless its value asks for nothing, e.g. `tools: []`); or ignored, where ignoring it
changes no output (`user`, `metadata`, `store`...). Fields OpenAI does not document are accepted, as
OpenAI's API and vLLM do (clients send vendor extras), and logged. Known fields with a wrong type or value
are a 400 naming the field. Extensions beyond OpenAI's API, as in vLLM: `top_k`, `repetition_penalty`
(transformers' multiplicative penalty), `min_tokens`, and `ignore_eos` (generate exactly max_tokens tokens,
for benchmarks).
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
                      "min_tokens", "ignore_eos"})


class Policy(NamedTuple):
    """What phi-onnx does with one request field OpenAI documents."""

    action: Literal["honoured", "refused", "ignored"]
    #: Refused: what the field asks for (said in the 400). Ignored: why ignoring it changes no output.
    note: str = ""
    #: Refused: the values that ask for nothing and pass (null always does).
    allowed: tuple[Any, ...] = ()


_HONOURED = Policy("honoured")
_TOOLS = "function calling"
_UNUSED = "nothing in the output depends on it"
#: Both endpoints' fields (OpenAI documents them for both).
_SAMPLING_FIELDS: dict[str, Policy] = {
    "model": _HONOURED, "max_tokens": _HONOURED, "temperature": _HONOURED, "top_p": _HONOURED, "seed": _HONOURED,
    "stop": _HONOURED, "stream": _HONOURED, "stream_options": _HONOURED, "presence_penalty": _HONOURED,
    "frequency_penalty": _HONOURED, "logprobs": _HONOURED,
    "n": _HONOURED,  # 1 only (one choice per request): any other value is a 400 from the model's type
    "logit_bias": Policy("refused", "per-token logit biases", ({},)),
    "user": Policy("ignored", "an end-user id for OpenAI's abuse monitoring; " + _UNUSED),
}
#: POST /v1/chat/completions: every request field OpenAI documents, and what phi-onnx does with it.
CHAT_FIELDS: dict[str, Policy] = {
    **_SAMPLING_FIELDS,
    "messages": _HONOURED, "max_completion_tokens": _HONOURED, "top_logprobs": _HONOURED,
    "response_format": Policy("refused", "structured output (JSON mode or a JSON schema)", ({"type": "text"},)),
    "tools": Policy("refused", _TOOLS, ([],)),
    "tool_choice": Policy("refused", _TOOLS, ("none",)),
    "parallel_tool_calls": Policy("refused", _TOOLS),
    "functions": Policy("refused", _TOOLS, ([],)),
    "function_call": Policy("refused", _TOOLS, ("none",)),
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
    "role": _HONOURED,  # system, developer (as system), user, assistant; tool and function messages are a 400
    "content": _HONOURED,  # a string or text parts; image, audio and file parts are a 400 (the models read text)
    "name": Policy("ignored", "a participant's name; Phi's chat templates have no place for it"),
    "tool_calls": Policy("refused", _TOOLS, ([],)),
    "function_call": Policy("refused", _TOOLS),
    "tool_call_id": Policy("refused", _TOOLS),
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
_TOOL_ROLES = {"tool": "tool results", "function": "function results"}

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

    def stops(self) -> tuple[str, ...]:
        """The stop strings, checked (at most 4, none empty)."""
        stops = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if len(stops) > MAX_STOPS or any(not s for s in stops):
            raise ApiError(400, f"'stop' takes at most {MAX_STOPS} non-empty strings.", param="stop")
        return stops


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        """The content as one string (text parts joined)."""
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[Int, Field(ge=1)] | None = None
    logprobs: StrictBool = False
    top_logprobs: Annotated[Int, Field(ge=0, le=20)] | None = None

    def characters(self) -> int:
        """Characters of the messages' text, leading and trailing whitespace aside (a chat template may trim it)."""
        return sum(len(message.text().strip()) for message in self.messages)


class CompletionRequest(_Sampling):
    prompt: str | Annotated[list[Annotated[Int, Field(ge=0)]], Field(min_length=1)] | \
        Annotated[list[str], Field(min_length=1, max_length=1)]
    max_tokens: Annotated[Int, Field(ge=1)] | None = 16  # OpenAI's default for completions
    logprobs: Annotated[Int, Field(ge=0, le=5)] | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, value: Any) -> Any:
        # Each wrong shape gets its own message: pydantic's union error reads the same for all of them.
        if not isinstance(value, list):
            return value
        if not value:
            raise ValueError("an empty list holds no prompt; send a string or a list of token ids")
        if len(value) > 1 and all(isinstance(item, str) for item in value):
            raise ValueError(f"this is {len(value)} prompts, and phi-onnx answers one prompt per request; send "
                             "them as separate requests")
        if any(isinstance(item, list) for item in value):
            raise ValueError("a list of token-id lists is several prompts, and phi-onnx answers one prompt per "
                             "request; send them as separate requests")
        for index, item in enumerate(value):
            if isinstance(item, int | float) and not isinstance(item, bool) and item < 0:
                raise ValueError(f"item {index} is {item}, and token ids are 0 or more")
        return value

    def text(self) -> str | None:
        """The prompt when it is text (a string or a list of one string), else None (token ids)."""
        if isinstance(self.prompt, str):
            return self.prompt
        return self.prompt[0] if isinstance(self.prompt[0], str) else None


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
            raise ApiError(400, f"Unsupported parameter: '{at}.role' is '{role}': {_TOOL_ROLES[role]} belong to "
                           f"{_TOOLS}, which phi-onnx does not do.", param=f"{at}.role", code="unsupported_parameter")
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


_FIELDS = set(ChatRequest.model_fields) | set(CompletionRequest.model_fields) | set(ChatMessage.model_fields) \
    | set(TextPart.model_fields) | set(StreamOptions.model_fields)

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
