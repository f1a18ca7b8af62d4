"""OpenAI request bodies (pydantic) and the OpenAI error shape.

Unknown fields are ignored, as OpenAI's API and vLLM do (clients send fields a server may lack);
known fields with a wrong type or value are a 400 naming the field. Extensions beyond OpenAI's
API, as in vLLM: `top_k`, `repetition_penalty` (transformers' multiplicative penalty),
`min_tokens`, and `ignore_eos` (generate exactly max_tokens tokens, for benchmarks).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, ValidationError, model_validator

MAX_STOPS = 4
#: Fields OpenAI's API documents as "or null" whose default here is not None: null means the default.
NULLABLE = frozenset({"stream", "n", "presence_penalty", "frequency_penalty", "logprobs", "include_usage", "echo",
                      "min_tokens", "ignore_eos"})


def _not_text(value: Any) -> Any:
    # Lax mode would read "5" as 5, "0.7" as 0.7 and true as 1; OpenAI's API rejects them, and a client
    # that sends one has a bug it should hear about.
    if isinstance(value, str | bytes | bool):
        raise ValueError(f"Input should be a number, not {type(value).__name__} {value!r}")
    return value


#: Numbers: an int field still takes 1.0 (lax), never "1".
Int = Annotated[int, BeforeValidator(_not_text)]
Float = Annotated[float, BeforeValidator(_not_text)]


class ApiError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} with `status`."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The JSON body OpenAI's clients parse."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


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


class CompletionRequest(_Sampling):
    prompt: str | Annotated[list[Annotated[Int, Field(ge=0)]], Field(min_length=1)] | \
        Annotated[list[str], Field(min_length=1, max_length=1)]
    max_tokens: Annotated[Int, Field(ge=1)] | None = 16  # OpenAI's default for completions
    logprobs: Annotated[Int, Field(ge=0, le=5)] | None = None
    echo: Literal[False] = False
    suffix: None = None


def parse(kind: type[_Sampling], data: Any) -> Any:
    """Validate a decoded JSON body; a ValidationError becomes a 400 naming the first bad field."""
    if not isinstance(data, dict):
        raise ApiError(400, "The request body must be a JSON object.")
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
