"""POST /v1/chat/completions: a chat request to a prompt and options, engine events to OpenAI's
chat.completion object or chat.completion.chunk stream.

To extend a request (structured output, tools), override `OpenAIServingChat.logits_processors`
(constraints applied before each token is sampled) and `ChatResponseBuilder` (how the reply looks).
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from phi_onnx.errors import PhiOnnxError
from phi_onnx.runtime.scheduler import FinishEvent, TokenEvent
from phi_onnx.serve.schema import ApiError, ChatRequest
from phi_onnx.serve.serving_engine import OpenAIServing, ResponseBuilder


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
        return {"message": {"role": "assistant", "content": finish.text}}

    def delta(self, text: str | None, first: bool) -> dict[str, Any]:
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        if text is not None:
            delta["content"] = text
        return {"delta": delta}

    def opening(self, usage: bool) -> list[str]:
        return [self.chunk("", [], None, usage, first=True)]


class OpenAIServingChat(OpenAIServing):
    """The chat endpoint: renders the messages with the model's chat template."""

    param = "messages"
    builder = ChatResponseBuilder

    def logprobs(self, body: ChatRequest) -> int | None:
        return (body.top_logprobs or 0) if body.logprobs else None

    def max_tokens(self, body: ChatRequest) -> int | None:
        return body.max_completion_tokens or body.max_tokens

    def messages(self, body: ChatRequest) -> list[dict[str, Any]]:
        """The messages as the chat template takes them (OpenAI's developer role is the system role)."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]

    async def create(self, request: Request, body: ChatRequest) -> Response:
        """Answer one parsed chat request."""
        loaded, _ = self.client.engine()
        self.check_length(body.characters(), self.max_tokens(body))
        try:
            # Rendering and tokenizing a large body takes a while: off the event loop.
            prompt = await asyncio.to_thread(loaded.chat_prompt_ids, self.messages(body))
        except PhiOnnxError as error:
            raise ApiError(400, error.message, param="messages") from None
        return await self.respond(request, body, prompt)
