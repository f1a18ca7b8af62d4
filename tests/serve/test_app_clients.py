"""The app clients people already use, against a live server: LangChain `ChatOpenAI`, LiteLLM and instructor,
on tiny-phi3 (the generic tool format) and the Phi-4-mini tools fixture (its own format). The models' weights
are random or tiny: only the server's constrained decoding makes their answers valid, so each assertion below
fails if a client's `response_format`, `tools` or `tool_choice` were dropped or misread.

No network beyond loopback: every name lookup in this module goes through `loopback_only`, which refuses any
other host at once (the test machine has no internet, where a lookup would hang) and fails the test that made it.
"""

from __future__ import annotations

import importlib.util
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pytest
from serve_helpers import API_KEY, MODEL_NAME

pydantic = pytest.importorskip("pydantic")
openai = pytest.importorskip("openai")
pytestmark = [
    # LiteLLM's TypedDicts use ReadOnly, which pydantic warns about when LiteLLM is imported
    pytest.mark.filterwarnings("ignore:.*ReadOnly.*:UserWarning"),
    # LangChain's streamed structured output puts the parsed object in a field typed None, and pydantic says so
    pytest.mark.filterwarnings("ignore:Pydantic serializer warnings:UserWarning"),
]

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
ASK = "What is the weather in Paris?"
# tokens to answer in: tiny-phi3's 512-token slots hold the tools' schemas and ~100 tokens more
BUDGET = {"tiny": 90, "phi4": 300}


# extra="forbid" (additionalProperties: false, as OpenAI's strict mode asks): an open object lets a random
# model add keys of its own until max_tokens, as the schema allows
class Person(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    name: str = pydantic.Field(max_length=10)
    age: int = pydantic.Field(ge=0, le=120)
    pet: Literal["cat", "dog", "none"]


class GetWeather(pydantic.BaseModel):
    """Weather of a city."""

    model_config = pydantic.ConfigDict(extra="forbid")

    city: str = pydantic.Field(max_length=12)
    unit: Literal["C", "F"]


class Add(pydantic.BaseModel):
    """Add two integers."""

    model_config = pydantic.ConfigDict(extra="forbid")

    a: int = pydantic.Field(ge=-99, le=99)
    b: int = pydantic.Field(ge=-99, le=99)


TOOL_MODELS = {"GetWeather": GetWeather, "Add": Add}


def openai_tool(model: type[Any]) -> dict[str, Any]:
    """`model` as the OpenAI function tool a LiteLLM user writes by hand (no pydantic titles)."""
    schema = model.model_json_schema()
    schema.pop("title")
    for field in schema["properties"].values():
        field.pop("title")
    return {"type": "function", "function": {"name": model.__name__, "description": model.__doc__,
                                             "parameters": schema}}


@pytest.fixture(scope="module")
def loopback_only() -> Iterator[list[str]]:
    """Refuse every name lookup but loopback (recorded, raised at once), and keep LiteLLM off the network:
    it fetches its model-cost map from GitHub unless LITELLM_LOCAL_MODEL_COST_MAP is set, and points
    TIKTOKEN_CACHE_DIR at the encodings it bundles when it counts tokens (set here first, so the change
    is undone when the module ends)."""
    attempts: list[str] = []
    lookup = socket.getaddrinfo

    def guarded(host: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else str(host)
        if name not in LOOPBACK:
            attempts.append(name)
            raise socket.gaierror(socket.EAI_NONAME, f"{name}: the app-client tests reach loopback only")
        return lookup(host, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket, "getaddrinfo", guarded)
        patch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        patch.setenv("LITELLM_OFFLINE_MODE", "true")
        spec = importlib.util.find_spec("litellm")
        if spec and spec.submodule_search_locations:
            bundled = Path(spec.submodule_search_locations[0]) / "litellm_core_utils" / "tokenizers"
            patch.setenv("TIKTOKEN_CACHE_DIR", str(bundled))
        yield attempts


@pytest.fixture(autouse=True)
def no_lookups_beyond_loopback(loopback_only: list[str]) -> Iterator[None]:
    before = len(loopback_only)
    yield
    assert loopback_only[before:] == [], "a client tried to reach the network"


def served(which: str, request: pytest.FixtureRequest) -> tuple[str, str, str]:
    """(base url, api key, model name) of the tiny or the Phi-4-mini server."""
    if which == "phi4":
        return f"{request.getfixturevalue('phi4_server').url}/v1", "none", "phi4"
    return f"{request.getfixturevalue('live_server').url}/v1", API_KEY, MODEL_NAME


# -- LangChain ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def langchain(loopback_only: list[str]) -> Any:
    return pytest.importorskip("langchain_openai")


def chat_model(langchain: Any, which: str, request: pytest.FixtureRequest, **options: Any) -> Any:
    url, key, model = served(which, request)
    return langchain.ChatOpenAI(model=model, base_url=url, api_key=key, max_retries=0, timeout=120, **options)


@pytest.mark.parametrize("which", ["tiny", "phi4"])
@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_langchain_with_structured_output_returns_the_model(langchain: Any, which: str, method: str,
                                                            request: pytest.FixtureRequest) -> None:
    for seed in range(3):
        llm = chat_model(langchain, which, request, temperature=1, seed=seed, max_tokens=BUDGET[which])
        structured = llm.with_structured_output(Person, method=method, include_raw=True)
        reply = structured.invoke("Who are you?")
        assert reply["parsing_error"] is None, (seed, reply)
        person = reply["parsed"]
        assert isinstance(person, Person), (seed, reply)
        raw = reply["raw"]
        if method == "function_calling":  # the answer came as a call of the schema's function
            assert [call["name"] for call in raw.tool_calls] == ["Person"]
            assert Person.model_validate(raw.tool_calls[0]["args"]) == person
            assert raw.response_metadata["finish_reason"] == "tool_calls"
        else:
            assert Person.model_validate_json(raw.content) == person
            assert raw.response_metadata["finish_reason"] == "stop"


@pytest.mark.parametrize("which", ["tiny", "phi4"])
def test_langchain_bind_tools_and_the_tool_message_loop(langchain: Any, which: str,
                                                        request: pytest.FixtureRequest) -> None:
    from langchain_core.messages import AIMessage, HumanMessage, ToolMessage

    llm = chat_model(langchain, which, request, temperature=1, max_tokens=BUDGET[which])
    for seed in range(3):
        bound = llm.bind_tools([GetWeather, Add], tool_choice="any", parallel_tool_calls=False)
        ask = HumanMessage(ASK)
        first = bound.invoke([ask], seed=seed)
        assert isinstance(first, AIMessage) and first.response_metadata["finish_reason"] == "tool_calls", seed
        assert len(first.tool_calls) == 1 and not first.invalid_tool_calls
        call = first.tool_calls[0]
        assert call["id"].startswith("call_")
        TOOL_MODELS[call["name"]].model_validate(call["args"])  # the arguments fit the tool's schema
        # the loop: the tool's result goes back as a ToolMessage and the model answers
        history = [ask, first, ToolMessage(json.dumps({"temperature": 21}), tool_call_id=call["id"])]
        answer = llm.bind_tools([GetWeather, Add], tool_choice="none").invoke(history, seed=seed, max_tokens=8)
        assert isinstance(answer, AIMessage) and not answer.tool_calls
        assert answer.response_metadata["finish_reason"] in ("stop", "length")
        alone = llm.bind_tools([GetWeather, Add], tool_choice="none").invoke([ask], max_tokens=1)
        # the call and its result were rendered into the prompt
        assert answer.usage_metadata["input_tokens"] > alone.usage_metadata["input_tokens"] + 10


@pytest.mark.parametrize("which", ["tiny", "phi4"])
def test_langchain_streams_tool_calls_and_structured_output(langchain: Any, which: str,
                                                            request: pytest.FixtureRequest) -> None:
    """Streamed, LangChain joins the calls' argument fragments by index: the joined message has whole calls."""
    llm = chat_model(langchain, which, request, temperature=1, seed=2, max_tokens=BUDGET[which])
    chunks = list(llm.bind_tools([GetWeather, Add], tool_choice="any", parallel_tool_calls=False).stream(ASK))
    assert len(chunks) > 2
    joined = chunks[0]
    for chunk in chunks[1:]:
        joined += chunk
    assert len(joined.tool_calls) == 1 and not joined.invalid_tool_calls
    call = joined.tool_calls[0]
    assert call["id"].startswith("call_")
    TOOL_MODELS[call["name"]].model_validate(call["args"])
    assert joined.response_metadata["finish_reason"] == "tool_calls"
    people = list(llm.with_structured_output(Person, method="json_schema").stream("Who are you?"))
    assert people and isinstance(people[-1], Person)


# -- LiteLLM --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def litellm(loopback_only: list[str]) -> Any:
    return pytest.importorskip("litellm")


def litellm_call(litellm: Any, which: str, request: pytest.FixtureRequest, **options: Any) -> Any:
    url, key, model = served(which, request)
    return litellm.completion(model=f"openai/{model}", api_base=url, api_key=key, timeout=120, num_retries=0,
                              max_retries=0, **options)


@pytest.mark.parametrize("which", ["tiny", "phi4"])
def test_litellm_response_format_a_pydantic_model(litellm: Any, which: str, request: pytest.FixtureRequest) -> None:
    for seed in range(3):
        reply = litellm_call(litellm, which, request, messages=[{"role": "user", "content": "Who are you?"}],
                             response_format=Person, temperature=1, seed=seed, max_tokens=BUDGET[which])
        assert reply.choices[0].finish_reason == "stop", seed
        Person.model_validate_json(reply.choices[0].message.content)
    schema = {"type": "json_schema", "json_schema": {"name": "person", "schema": Person.model_json_schema(),
                                                     "strict": True}}
    reply = litellm_call(litellm, which, request, messages=[{"role": "user", "content": "Hi"}],
                         response_format=schema, temperature=1, seed=7, max_tokens=BUDGET[which])
    Person.model_validate_json(reply.choices[0].message.content)


@pytest.mark.parametrize("which", ["tiny", "phi4"])
def test_litellm_streams_structured_output(litellm: Any, which: str, request: pytest.FixtureRequest) -> None:
    stream = litellm_call(litellm, which, request, messages=[{"role": "user", "content": "Who are you?"}],
                          response_format=Person, temperature=1, seed=5, max_tokens=BUDGET[which], stream=True)
    chunks = list(stream)
    assert len(chunks) > 2
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    Person.model_validate_json(text)


@pytest.mark.parametrize("which", ["tiny", "phi4"])
def test_litellm_tools_give_tool_calls(litellm: Any, which: str, request: pytest.FixtureRequest) -> None:
    tools = [openai_tool(GetWeather), openai_tool(Add)]
    for seed in range(3):
        reply = litellm_call(litellm, which, request, messages=[{"role": "user", "content": ASK}], tools=tools,
                             tool_choice="required", parallel_tool_calls=False, temperature=1, seed=seed,
                             max_tokens=BUDGET[which])
        assert reply.choices[0].finish_reason == "tool_calls", seed
        calls = reply.choices[0].message.tool_calls
        assert len(calls) == 1 and calls[0].id.startswith("call_")
        TOOL_MODELS[calls[0].function.name].model_validate_json(calls[0].function.arguments)
    # a named function, parallel calls allowed where the slots have room for a random model's several calls
    named = {"type": "function", "function": {"name": "Add"}}
    reply = litellm_call(litellm, which, request, messages=[{"role": "user", "content": "2 plus 3?"}], tools=tools,
                         tool_choice=named, parallel_tool_calls=which == "phi4", temperature=1, seed=3,
                         max_tokens=BUDGET[which])
    assert reply.choices[0].finish_reason == "tool_calls"
    assert {call.function.name for call in reply.choices[0].message.tool_calls} == {"Add"}
    for call in reply.choices[0].message.tool_calls:
        Add.model_validate_json(call.function.arguments)


# -- instructor ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def instructor(loopback_only: list[str]) -> Any:
    return pytest.importorskip("instructor")


@pytest.mark.parametrize("which", ["tiny", "phi4"])
@pytest.mark.parametrize("mode", ["JSON_SCHEMA", "TOOLS"])
def test_instructor_returns_the_response_model(instructor: Any, which: str, mode: str,
                                               request: pytest.FixtureRequest) -> None:
    url, key, model = served(which, request)
    client = instructor.from_openai(openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=120),
                                    mode=getattr(instructor.Mode, mode))
    # a random model calls the function again and again where parallel calls are allowed (OpenAI's default):
    # tiny-phi3's slots have no room for that
    options = {"parallel_tool_calls": False} if which == "tiny" and mode == "TOOLS" else {}
    for seed in range(3):
        person, completion = client.chat.completions.create_with_completion(
            model=model, response_model=Person, messages=[{"role": "user", "content": "Who are you?"}],
            max_retries=0, temperature=1, seed=seed, max_tokens=BUDGET[which], **options)
        assert isinstance(person, Person), seed  # instructor's subclass of it
        message = completion.choices[0].message
        if mode == "TOOLS":  # instructor asked for a call of its function and got one
            assert completion.choices[0].finish_reason == "tool_calls"
            assert {call.function.name for call in message.tool_calls} == {"Person"}
            arguments = message.tool_calls[0].function.arguments
        else:
            arguments = message.content
        assert Person.model_validate_json(arguments).model_dump() == person.model_dump()


@pytest.mark.parametrize("which", ["tiny", "phi4"])
def test_instructor_json_mode_gets_a_json_object_and_reads_the_cut(instructor: Any, which: str,
                                                                   request: pytest.FixtureRequest) -> None:
    """Mode.JSON sends `response_format: json_object`, the schema only in the prompt. A random model writes
    an object whose strings never close; the server says where max_tokens cut it, and instructor raises its
    IncompleteOutputException (not a validation error on free text)."""
    url, key, model = served(which, request)
    client = instructor.from_openai(openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=120),
                                    mode=instructor.Mode.JSON)
    sent: list[dict[str, Any]] = []
    replies: list[Any] = []
    client.on("completion:kwargs", lambda *args, **kwargs: sent.append(kwargs))
    client.on("completion:response", replies.append)
    from instructor.core import IncompleteOutputException

    with pytest.raises(IncompleteOutputException):
        client.chat.completions.create(model=model, response_model=Person, max_retries=0, temperature=1, seed=1,
                                       messages=[{"role": "user", "content": "Who are you?"}], max_tokens=40)
    assert sent[0]["response_format"] == {"type": "json_object"}
    assert "Person" in json.dumps(sent[0]["messages"])  # the schema went in the prompt
    choice = replies[0].choices[0]
    assert choice.finish_reason == "length" and choice.message.content.startswith("{")
    assert replies[0].usage.completion_tokens == 40
