"""What chat and completions share: a request's checks and options, the engine call, and the reply
(one JSON object, or an SSE stream of chunks). `serving_chat` and `serving_completions` fill in the
prompt and the response shapes."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from phi_onnx.errors import PhiOnnxError
from phi_onnx.runtime.model import Model
from phi_onnx.runtime.options import GenerationOptions, LogitsProcessor
from phi_onnx.runtime.scheduler import FinishEvent, TokenEvent
from phi_onnx.serve.engine_client import EngineClient, Generation, ShuttingDown, shutting_down_error
from phi_onnx.serve.schema import ApiError

#: The scheduler's finish reasons as OpenAI's finish_reason (any other reason is an error).
FINISH = {"eos": "stop", "stop": "stop", "length": "length"}


class ResponseBuilder:
    """Builds OpenAI's response and chunk objects for one request; subclasses give the endpoint's shapes."""

    prefix = "cmpl-"
    object_name = "text_completion"
    chunk_name = "text_completion"

    def __init__(self, model: Model, name: str, logprobs: int | None, token_ids: bool = False) -> None:
        self.model, self.name, self.logprobs, self.token_ids = model, name, logprobs, token_ids
        self.id = self.prefix + uuid.uuid4().hex
        self.created = int(time.time())

    def token_text(self, token_id: int) -> str:
        return self.model.tokenizer.decode([token_id], skip_special_tokens=False)

    def usage(self, finish: FinishEvent) -> dict[str, Any]:
        return {"prompt_tokens": finish.prompt_tokens, "completion_tokens": finish.completion_tokens,
                "total_tokens": finish.prompt_tokens + finish.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": finish.cached_tokens}}

    def head(self, chunk: bool) -> dict[str, Any]:
        return {"id": self.id, "object": self.chunk_name if chunk else self.object_name, "created": self.created,
                "model": self.name}

    def choice_logprobs(self, tokens: list[TokenEvent]) -> dict[str, Any] | None:
        raise NotImplementedError

    def whole_choice(self, tokens: list[TokenEvent], finish: FinishEvent) -> dict[str, Any]:
        """The endpoint's part of a non-streaming choice (message or text)."""
        raise NotImplementedError

    def delta(self, text: str | None, first: bool) -> dict[str, Any]:
        """The endpoint's part of a streamed choice."""
        raise NotImplementedError

    def whole(self, tokens: list[TokenEvent], finish: FinishEvent) -> dict[str, Any]:
        """The non-streaming response."""
        choice: dict[str, Any] = {"index": 0, "finish_reason": FINISH[finish.reason],
                                  "logprobs": self.choice_logprobs(tokens), **self.whole_choice(tokens, finish)}
        if self.token_ids:
            choice["token_ids"] = [t.token_id for t in tokens]
        return {**self.head(False), "choices": [choice], "usage": self.usage(finish)}

    def chunk(self, text: str | None, tokens: list[TokenEvent], finish: str | None, usage: bool,
              first: bool = False) -> str:
        """One SSE `data:` line with a delta."""
        choice: dict[str, Any] = {"index": 0, "logprobs": self.choice_logprobs(tokens) if tokens else None,
                                  "finish_reason": finish, **self.delta(text, first)}
        if self.token_ids:
            choice["token_ids"] = [t.token_id for t in tokens]
        body = {**self.head(True), "choices": [choice]}
        if usage:
            body["usage"] = None
        return f"data: {json.dumps(body)}\n\n"

    def opening(self, usage: bool) -> list[str]:
        """Chunks sent before the first token (chat: the role)."""
        return []

    def usage_chunk(self, finish: FinishEvent) -> str:
        """The final chunk of stream_options.include_usage: empty choices, the usage."""
        return f"data: {json.dumps({**self.head(True), 'choices': [], 'usage': self.usage(finish)})}\n\n"


class OpenAIServing:
    """One endpoint over the engine client: checks a parsed request, submits it, and answers.

    Subclasses set `param` (the field a prompt error names), `builder` (their ResponseBuilder) and
    implement `prompt_ids`; `logits_processors` is the hook for per-request constraints (structured
    output, tools): what it returns goes to `GenerationOptions.logits_processors`.
    """

    param = "prompt"
    builder: type[ResponseBuilder] = ResponseBuilder

    def __init__(self, client: EngineClient, served_name: Callable[[], str]) -> None:
        self.client, self.served_name = client, served_name

    def check_length(self, characters: int, max_tokens: int | None) -> None:
        """400 for a prompt too long to fit whatever its text, before it is tokenized (phi_onnx.serve.limits)."""
        per_token, sched = self.client.chars_per_token, self.client.scheduler
        if per_token is None or sched is None:
            return
        room = sched.capacity - (max_tokens or 1)
        if room > 0 and characters > room * per_token:  # room <= 0: check_request says max_tokens is too large
            raise ApiError(400, f"This model's maximum context length is {sched.capacity} tokens. However, your "
                           f"prompt's {characters} characters need more than the {room} tokens left beside "
                           f"{max_tokens or 1} for the completion (a token of this model covers at most {per_token} "
                           "characters). Please reduce the prompt or the completion length.",
                           param=self.param, code="context_length_exceeded")

    def logits_processors(self, body: Any) -> list[LogitsProcessor]:
        """Per-request logits processors (none for plain sampling)."""
        return []

    def logprobs(self, body: Any) -> int | None:
        """Top alternatives to report per token (0: the chosen token's only), or None for no logprobs."""
        raise NotImplementedError

    def max_tokens(self, body: Any) -> int | None:
        return body.max_tokens

    def options(self, model: Model, body: Any, budget: int) -> GenerationOptions:
        """The request's GenerationOptions (a 400 for values the runtime refuses)."""
        extra: dict[str, Any] = {}
        logprobs = self.logprobs(body)
        if logprobs is not None:
            extra.update(logprobs=True, top_logprobs=logprobs)
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(body, name) is not None:
                extra[name] = getattr(body, name)
        processors = self.logits_processors(body)
        if processors:
            extra["logits_processors"] = processors
        try:
            return model.options(
                max_new_tokens=budget, min_new_tokens=budget if body.ignore_eos else min(body.min_tokens, budget),
                temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, seed=body.seed,
                repetition_penalty=body.repetition_penalty, stop=body.stops(), **extra)
        except PhiOnnxError as error:
            raise ApiError(400, error.message) from None

    async def respond(self, request: Request, body: Any, prompt: list[int]) -> Response:
        """Check `prompt` against the model and its limits, generate, and answer (JSON or SSE)."""
        loaded, sched = self.client.engine()
        name = self.served_name()
        if body.model is not None and body.model != name:
            raise ApiError(404, f"The model '{shown(body.model)}' does not exist; this server serves '{name}'.",
                           param="model", code="model_not_found")
        if not prompt:
            raise ApiError(400, "The prompt is empty.", param=self.param)
        max_tokens = self.max_tokens(body)
        need = len(prompt) + (max_tokens or 1)
        if need > sched.capacity:
            raise ApiError(400, f"This model's maximum context length is {sched.capacity} tokens. However, you "
                           f"requested {need} tokens ({len(prompt)} in the prompt, {max_tokens or 1} for the "
                           "completion). Please reduce the prompt or the completion length.",
                           param=self.param, code="context_length_exceeded")
        options = self.options(loaded, body, max_tokens or sched.capacity - len(prompt))
        generation = self.client.generate(prompt, options)
        reply = self.builder(loaded, name, self.logprobs(body), body.return_token_ids)
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(self.stream(generation, reply, usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await self.whole(request, generation, reply)

    async def whole(self, request: Request, generation: Generation, reply: ResponseBuilder) -> Response:
        """The non-streaming answer: every token, then one JSON response."""
        async def watch() -> None:
            # Request.is_disconnected() never sees a disconnect behind the http middleware (its receive,
            # called in a cancelled scope, gives up at once), so wait for the message itself.
            while (await request.receive())["type"] != "http.disconnect":
                pass
            generation.cancel()

        watcher = asyncio.create_task(watch())
        tokens: list[TokenEvent] = []
        try:
            async for event in generation.events():
                if isinstance(event, TokenEvent):
                    tokens.append(event)
        except ShuttingDown:
            raise shutting_down_error() from None
        finally:
            watcher.cancel()
        assert isinstance(event, FinishEvent)
        if event.reason == "cancelled" and watcher.done() and not watcher.cancelled():
            return Response(status_code=499)  # the client went away; nobody reads this
        if event.reason not in FINISH:
            raise ApiError(500, f"Generation failed: {event.error or event.reason}.", type="server_error")
        return JSONResponse(reply.whole(tokens, event))

    async def stream(self, generation: Generation, reply: ResponseBuilder, usage: bool) -> AsyncIterator[str]:
        """SSE: the opening chunks (chat: the role), content deltas, a finish chunk, the usage chunk if
        asked, [DONE]. Ended by shutdown: an error event, then [DONE]."""
        events = generation.events()
        try:
            for line in reply.opening(usage):
                yield line
            try:
                async for event in events:
                    if isinstance(event, FinishEvent):
                        break
                    if event.text or reply.logprobs is not None or reply.token_ids:
                        yield reply.chunk(event.text, [event], None, usage)
            except ShuttingDown:
                yield f"data: {json.dumps(shutting_down_error().body())}\n\n"
                yield "data: [DONE]\n\n"
                return
            if event.reason not in FINISH:
                error = ApiError(500, f"Generation failed: {event.error or event.reason}.", type="server_error")
                yield f"data: {json.dumps(error.body())}\n\n"
            else:
                yield reply.chunk(None, [], FINISH[event.reason], usage)
                if usage:
                    yield reply.usage_chunk(event)
            yield "data: [DONE]\n\n"
        finally:
            await events.aclose()
            generation.cancel()  # the client went away (this generator was cancelled or closed): free the slot


def shown(text: str, limit: int = 100) -> str:
    """Client text quoted in a message, cut short: an error must not echo megabytes back."""
    return text if len(text) <= limit else text[:limit] + "..."
