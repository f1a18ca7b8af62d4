"""POST /v1/chat/completions: a chat request to a prompt and options, engine events to OpenAI's
chat.completion object or chat.completion.chunk stream.

To extend a request (structured output, tools), override `OpenAIServingChat.logits_processors`
(constraints applied before each token is sampled) and `ChatResponseBuilder` (how the reply looks).
"""

from __future__ import annotations

import asyncio
from typing import Any, NamedTuple

from fastapi import Request
from fastapi.responses import Response

from phi_onnx.errors import PhiOnnxError
from phi_onnx.runtime.chat import check_messages
from phi_onnx.runtime.grammar import constraint_from
from phi_onnx.runtime.model import Model
from phi_onnx.runtime.options import LogitsProcessor
from phi_onnx.runtime.scheduler import FinishEvent, TokenEvent
from phi_onnx.runtime.tools import (
    ResponseFormatError,
    ToolCallDelta,
    ToolCallStream,
    parse_tool_calls,
    plan_reply,
)
from phi_onnx.serve.schema import ApiError, ChatRequest
from phi_onnx.serve.serving_engine import OpenAIServing, ResponseBuilder


def _format_error(error: PhiOnnxError) -> ApiError:
    """A response_format that cannot be honoured, as OpenAI's 400 naming the field."""
    return ApiError(400, f"Invalid value for 'response_format': {error.message}", param="response_format",
                    code="invalid_value")


class PreparedReply(NamedTuple):
    """What `OpenAIServingChat.prepare` gives a chat request: see there."""

    prompt: list[int]
    processors: list[LogitsProcessor]
    tool_format: str | None
    structured: bool
    tool_names: tuple[str, ...]


class ChatResponseBuilder(ResponseBuilder):
    """chat.completion objects and chat.completion.chunk lines."""

    prefix = "chatcmpl-"
    object_name = "chat.completion"
    chunk_name = "chat.completion.chunk"

    def _entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        text = self.token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    def choice_logprobs(self, tokens: list[TokenEvent]) -> dict[str, Any] | None:
        if self.logprobs is None:
            return None
        return {"content": [{**self._entry(e.token_id, e.logprob or 0.0),
                             "top_logprobs": [self._entry(t, lp) for t, lp in e.top_logprobs]} for e in tokens]}

    def whole_choice(self, tokens: list[TokenEvent], finish: FinishEvent) -> dict[str, Any]:
        if self.tool_format is None or finish.reason not in ("eos", "stop"):
            # a reply cut by max_tokens is not parsed: its calls may be incomplete (finish_reason says length)
            return {"message": {"role": "assistant", "content": finish.text}}
        content, calls = parse_tool_calls(finish.text, self.tool_format, structured=self.structured,
                                          names=self.tool_names)
        if not calls:
            return {"message": {"role": "assistant", "content": content}}
        return {"message": {"role": "assistant", "content": content, "tool_calls": [c.to_openai() for c in calls]},
                "finish_reason": "tool_calls"}

    def delta(self, text: str | None, first: bool) -> dict[str, Any]:
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        if text is not None:
            delta["content"] = text
        return {"delta": delta}

    def pieces(self, index: int, text: str) -> list[dict[str, Any]]:
        if self.tool_format is None:
            return [self.delta(text, False)]
        return [self._piece(p) for p in self._parser(index).push(text)]

    def ending(self, index: int) -> tuple[list[dict[str, Any]], bool]:
        if self.tool_format is None:
            return [], False
        parser = self._parser(index)
        held = [self._piece(p) for p in parser.finish()]
        return held, bool(parser.calls)

    def _parser(self, index: int) -> ToolCallStream:
        assert self.tool_format is not None
        if index not in self._parsers:
            self._parsers[index] = ToolCallStream(self.tool_format, structured=self.structured, names=self.tool_names)
        return self._parsers[index]

    def _piece(self, piece: str | ToolCallDelta) -> dict[str, Any]:
        if isinstance(piece, str):
            return self.delta(piece, False)
        return {"delta": {"tool_calls": [piece.to_openai()]}}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._parsers: dict[int, ToolCallStream] = {}  # per streamed choice, when tool calls may come

    def opening(self, usage: bool, choices: int = 1) -> list[str]:
        return [self.chunk("", [], None, usage, first=True, index=i) for i in range(choices)]


class OpenAIServingChat(OpenAIServing):
    """The chat endpoint: renders the messages with the model's chat template (tools as the model's
    tool format has them, phi_onnx.runtime.tools), with response_format's constraint if any."""

    param = "messages"
    builder = ChatResponseBuilder

    def logprobs(self, body: ChatRequest) -> int | None:
        return (body.top_logprobs or 0) if body.logprobs else None

    def max_tokens(self, body: ChatRequest) -> int | None:
        return body.max_completion_tokens or body.max_tokens

    def messages(self, body: ChatRequest) -> list[dict[str, Any]]:
        """The messages as the chat template takes them (OpenAI's developer role is the system role)."""
        return [m.as_dict() for m in body.messages]

    def prepare(self, loaded: Model, body: ChatRequest) -> PreparedReply:
        """The prompt's token ids, the reply's logits processors (a grammar for response_format or tool
        calls), the tool format to parse the reply with (None: no tool calls expected), whether its
        text answer is structured (response_format with tool_choice "auto": parse with structured=True)
        and the names of the tools offered.
        Runs off the event loop (rendering, tokenizing and compiling a grammar take a while)."""
        asked = body.response_format.constraint() if body.response_format is not None else {}
        try:
            plan = plan_reply(self.messages(body), body.tool_list(), body.choice(), asked,
                              template_source=loaded.chat_template.source, vocabulary=loaded.tokenizer.vocabulary(),
                              parallel_tool_calls=body.parallel_tool_calls)
        except ResponseFormatError as error:
            raise _format_error(error) from None
        except PhiOnnxError as error:
            param = "tool_choice" if "tool_choice" in error.message else "tools"
            raise ApiError(400, error.message, param=param) from None
        processors: list[LogitsProcessor] = []
        if plan.constraint is not None:
            processors.append(loaded.grammar(plan.constraint))
        elif plan.switch is not None:
            processors.append(loaded.tool_call_switch(plan.switch))
        if plan.asked:
            try:
                constraint = constraint_from(**plan.asked)
            except PhiOnnxError as error:
                raise _format_error(error) from None
            if constraint is not None:
                processors.append(loaded.grammar(constraint))
        try:
            prompt = loaded.chat_prompt_ids(check_messages(plan.messages))
        except PhiOnnxError as error:
            raise ApiError(400, error.message, param="messages") from None
        return PreparedReply(prompt, processors, plan.tool_format, plan.structured, plan.names)

    async def create(self, request: Request, body: ChatRequest) -> Response:
        """Answer one parsed chat request."""
        loaded, _ = self.client.engine()
        self.check_model(body)
        self.check_length(body.characters(), self.max_tokens(body))
        prepared = await asyncio.to_thread(self.prepare, loaded, body)
        return await self.respond(request, body, [prepared.prompt], prepared.processors, prepared.tool_format,
                                  structured=prepared.structured, tool_names=prepared.tool_names)
