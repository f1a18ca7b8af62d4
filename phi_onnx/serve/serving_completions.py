"""POST /v1/completions: a prompt (text or token ids) to options, engine events to OpenAI's
text_completion object or stream."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from phi_onnx.runtime.scheduler import FinishEvent, TokenEvent
from phi_onnx.serve.schema import CompletionRequest
from phi_onnx.serve.serving_engine import OpenAIServing, ResponseBuilder


class CompletionResponseBuilder(ResponseBuilder):
    """text_completion objects and stream lines."""

    def choice_logprobs(self, tokens: list[TokenEvent]) -> dict[str, Any] | None:
        if self.logprobs is None:
            return None
        return {"tokens": [self.token_text(e.token_id) for e in tokens],
                "token_logprobs": [e.logprob for e in tokens],
                "top_logprobs": [{self.token_text(t): lp for t, lp in e.top_logprobs} for e in tokens],
                "text_offset": []}

    def whole_choice(self, tokens: list[TokenEvent], finish: FinishEvent) -> dict[str, Any]:
        return {"text": finish.text}

    def delta(self, text: str | None, first: bool) -> dict[str, Any]:
        return {"text": text or ""}


class OpenAIServingCompletion(OpenAIServing):
    """The completions endpoint: the prompt as given (text is encoded, token ids are used as they are)."""

    param = "prompt"
    builder = CompletionResponseBuilder

    def logprobs(self, body: CompletionRequest) -> int | None:
        return body.logprobs

    async def create(self, request: Request, body: CompletionRequest) -> Response:
        """Answer one parsed completion request: one choice per prompt (`index` in order)."""
        loaded, _ = self.client.engine()
        self.check_model(body)
        prompts = body.prompts()
        texts = [p for p in prompts if isinstance(p, str)]
        for text in texts:
            self.check_length(len(text), body.max_tokens)
        if texts:
            encoded = iter(await asyncio.to_thread(lambda: [loaded.encode(t) for t in texts]))
            ids = [next(encoded) if isinstance(p, str) else p for p in prompts]
        else:
            ids = [list(p) for p in prompts]  # type: ignore[arg-type]
        return await self.respond(request, body, ids)
