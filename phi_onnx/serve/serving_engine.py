"""What the endpoints share: a request's checks and options (logit_bias, logits processors), the engine
calls (one per prompt: a list of prompts gives one choice each), and the reply (one JSON object, or an SSE
stream of chunks keyed by choice index). `serving_chat` and `serving_completions` fill in the prompt and
the response shapes; `serving_responses` answers the Responses API over the chat machinery."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
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

    def __init__(self, model: Model, name: str, logprobs: int | None, token_ids: bool = False,
                 tool_format: str | None = None, *, structured: bool = False,
                 tool_names: tuple[str, ...] = ()) -> None:
        self.model, self.name, self.logprobs, self.token_ids = model, name, logprobs, token_ids
        self.tool_format = tool_format  # set when the reply may hold tool calls (chat with tools)
        self.structured = structured  # its text answer is structured output (tools.parse_tool_calls)
        self.tool_names = tool_names  # the tools offered (tools.parse_tool_calls' names)
        self.id = self.prefix + uuid.uuid4().hex
        self.created = int(time.time())

    def token_text(self, token_id: int) -> str:
        return self.model.tokenizer.decode([token_id], skip_special_tokens=False)

    def usage(self, finishes: list[FinishEvent]) -> dict[str, Any]:
        """Usage over every choice (each prompt counted once, as OpenAI does for a list of prompts)."""
        prompt = sum(f.prompt_tokens for f in finishes)
        completion = sum(f.completion_tokens for f in finishes)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": sum(f.cached_tokens for f in finishes)}}

    def head(self, chunk: bool) -> dict[str, Any]:
        return {"id": self.id, "object": self.chunk_name if chunk else self.object_name, "created": self.created,
                "model": self.name}

    def choice_logprobs(self, tokens: list[TokenEvent]) -> dict[str, Any] | None:
        raise NotImplementedError

    def whole_choice(self, tokens: list[TokenEvent], finish: FinishEvent) -> dict[str, Any]:
        """The endpoint's part of a non-streaming choice (message or text); it may set finish_reason."""
        raise NotImplementedError

    def delta(self, text: str | None, first: bool) -> dict[str, Any]:
        """The endpoint's part of a streamed choice."""
        raise NotImplementedError

    def pieces(self, index: int, text: str) -> list[dict[str, Any]]:
        """The deltas streamed text makes for choice `index` (chat with tools: content and call deltas)."""
        return [self.delta(text, False)]

    def ending(self, index: int) -> tuple[list[dict[str, Any]], bool]:
        """The deltas held back until choice `index` ends, and whether it made tool calls."""
        return [], False

    def whole(self, results: list[tuple[list[TokenEvent], FinishEvent]]) -> dict[str, Any]:
        """The non-streaming response: one choice per (tokens, finish)."""
        choices = []
        for index, (tokens, finish) in enumerate(results):
            choice: dict[str, Any] = {"index": index, "finish_reason": FINISH[finish.reason],
                                      "logprobs": self.choice_logprobs(tokens), **self.whole_choice(tokens, finish)}
            if self.token_ids:
                choice["token_ids"] = [t.token_id for t in tokens]
            choices.append(choice)
        return {**self.head(False), "choices": choices, "usage": self.usage([f for _, f in results])}

    def chunk(self, text: str | None, tokens: list[TokenEvent], finish: str | None, usage: bool,
              first: bool = False, index: int = 0, delta: dict[str, Any] | None = None) -> str:
        """One SSE `data:` line with a delta (`delta`, or the one `text` makes) for choice `index`."""
        choice: dict[str, Any] = {"index": index, "logprobs": self.choice_logprobs(tokens) if tokens else None,
                                  "finish_reason": finish, **(delta if delta is not None else self.delta(text, first))}
        if self.token_ids:
            choice["token_ids"] = [t.token_id for t in tokens]
        body = {**self.head(True), "choices": [choice]}
        if usage:
            body["usage"] = None
        return f"data: {json.dumps(body)}\n\n"

    def opening(self, usage: bool, choices: int = 1) -> list[str]:
        """Chunks sent before the first token (chat: the role)."""
        return []

    def usage_chunk(self, finishes: list[FinishEvent]) -> str:
        """The final chunk of stream_options.include_usage: empty choices, the usage."""
        return f"data: {json.dumps({**self.head(True), 'choices': [], 'usage': self.usage(finishes)})}\n\n"


class OpenAIServing:
    """One endpoint over the engine client: checks a parsed request, submits it, and answers.

    Subclasses set `param` (the field a prompt error names), `builder` (their ResponseBuilder) and
    implement `prompt_ids`; `logits_processors` is the hook for per-request constraints (structured
    output, tools): what it returns goes to `GenerationOptions.logits_processors`.
    """

    param = "prompt"
    builder: type[ResponseBuilder] = ResponseBuilder

    def __init__(self, client: EngineClient, served_names: Callable[[], list[str]]) -> None:
        self.client, self._names = client, served_names

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

    def check_model(self, body: Any) -> str:
        """The served name a request's `model` picks (any alias), or a 404."""
        names = self.served_names()
        if body.model is not None and body.model not in names:
            listed = "', '".join(names)
            raise ApiError(404, f"The model '{shown(body.model)}' does not exist; this server serves '{listed}'.",
                           param="model", code="model_not_found")
        return body.model if body.model is not None else names[0]

    def served_names(self) -> list[str]:
        """Every name the served model answers to, the main one first (then its adapters)."""
        return self._names()

    def base_names(self) -> list[str]:
        """The names that mean the base model (not one of its adapters)."""
        model = self.client.model
        adapters = set(model.adapters) if model is not None else set()
        names = self.served_names()
        return [n for n in names if n not in adapters] or names[:1]

    def logit_bias(self, model: Model, body: Any) -> dict[int, float] | None:
        """`logit_bias` with int keys; a 400 for an id the vocabulary lacks."""
        if not body.logit_bias:
            return None
        bias = {int(key): value for key, value in body.logit_bias.items()}
        vocab = model.folder.vocab_size
        outside = [key for key in bias if key >= vocab]
        if outside:
            raise ApiError(400, f"Invalid value for 'logit_bias': token id {outside[0]} is outside this model's "
                           f"vocabulary (ids 0..{vocab - 1}).", param="logit_bias", code="invalid_value")
        return bias

    def options(self, model: Model, body: Any, budget: int,
                processors: Sequence[LogitsProcessor] = ()) -> GenerationOptions:
        """The request's GenerationOptions (a 400 for values the runtime refuses)."""
        extra: dict[str, Any] = {}
        logprobs = self.logprobs(body)
        if logprobs is not None:
            extra.update(logprobs=True, top_logprobs=logprobs)
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(body, name) is not None:
                extra[name] = getattr(body, name)
        processors = [*self.logits_processors(body), *processors]
        if processors:
            extra["logits_processors"] = tuple(processors)
        bias = self.logit_bias(model, body)
        if bias:
            extra["logit_bias"] = bias
        if body.model is not None and body.model in model.adapters and body.model not in self.base_names():
            extra["adapter"] = body.model  # `model` names a switchable LoRA adapter: its rows use it
        try:
            return model.options(
                max_new_tokens=budget, min_new_tokens=budget if body.ignore_eos else min(body.min_tokens, budget),
                temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, seed=body.seed,
                repetition_penalty=body.repetition_penalty, stop=body.stops(), **extra)
        except PhiOnnxError as error:
            raise ApiError(400, error.message) from None

    def check_prompt(self, prompt: list[int], max_tokens: int | None, capacity: int) -> None:
        """400 for an empty prompt or one that leaves no room for the completion."""
        if not prompt:
            raise ApiError(400, "The prompt is empty.", param=self.param)
        need = len(prompt) + (max_tokens or 1)
        if need > capacity:
            raise ApiError(400, f"This model's maximum context length is {capacity} tokens. However, you "
                           f"requested {need} tokens ({len(prompt)} in the prompt, {max_tokens or 1} for the "
                           "completion). Please reduce the prompt or the completion length.",
                           param=self.param, code="context_length_exceeded")

    def submit(self, body: Any, prompts: list[list[int]], processors: Sequence[LogitsProcessor] = ()
               ) -> list[Generation]:
        """Check each prompt and submit it to the scheduler (all or none: a refusal cancels the others)."""
        loaded, sched = self.client.engine()
        max_tokens = self.max_tokens(body)
        for prompt in prompts:
            self.check_prompt(prompt, max_tokens, sched.capacity)
        generations: list[Generation] = []
        try:
            for prompt in prompts:
                options = self.options(loaded, body, max_tokens or sched.capacity - len(prompt), processors)
                generations.append(self.client.generate(prompt, options))
        except BaseException:
            for generation in generations:
                generation.cancel()
            raise
        return generations

    async def respond(self, request: Request, body: Any, prompts: list[list[int]],
                      processors: Sequence[LogitsProcessor] = (), tool_format: str | None = None, *,
                      structured: bool = False, tool_names: tuple[str, ...] = ()) -> Response:
        """Check `prompts` against the model and its limits, generate (one choice each), and answer (JSON or SSE)."""
        loaded, _ = self.client.engine()
        name = self.check_model(body)
        generations = self.submit(body, prompts, processors)
        reply = self.builder(loaded, name, self.logprobs(body), body.return_token_ids, tool_format,
                             structured=structured, tool_names=tool_names)
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(self.stream(generations, reply, usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await self.whole(request, generations, reply)

    async def collect(self, request: Request, generations: list[Generation]
                      ) -> list[tuple[list[TokenEvent], FinishEvent]] | None:
        """Every generation's tokens and finish (None when the client went away first)."""
        async def watch() -> None:
            # Request.is_disconnected() never sees a disconnect behind the http middleware (its receive,
            # called in a cancelled scope, gives up at once), so wait for the message itself.
            while (await request.receive())["type"] != "http.disconnect":
                pass
            for generation in generations:
                generation.cancel()

        async def gather(generation: Generation) -> tuple[list[TokenEvent], FinishEvent]:
            tokens: list[TokenEvent] = []
            async for event in generation.events():
                if isinstance(event, TokenEvent):
                    tokens.append(event)
            assert isinstance(event, FinishEvent)
            return tokens, event

        watcher = asyncio.create_task(watch())
        try:
            results = await asyncio.gather(*(gather(g) for g in generations))
        except ShuttingDown:
            raise shutting_down_error() from None
        finally:
            watcher.cancel()
            for generation in generations:
                generation.cancel()  # a no-op once finished
        if any(f.reason == "cancelled" for _, f in results) and watcher.done() and not watcher.cancelled():
            return None
        for _, finish in results:
            if finish.reason not in FINISH:
                raise ApiError(500, f"Generation failed: {finish.error or finish.reason}.", type="server_error")
        return list(results)

    async def whole(self, request: Request, generations: list[Generation], reply: ResponseBuilder) -> Response:
        """The non-streaming answer: every token, then one JSON response."""
        results = await self.collect(request, generations)
        if results is None:
            return Response(status_code=499)  # the client went away; nobody reads this
        return JSONResponse(reply.whole(results))

    async def stream(self, generations: list[Generation], reply: ResponseBuilder, usage: bool) -> AsyncIterator[str]:
        """SSE: the opening chunks (chat: the role), content deltas, a finish chunk per choice, the usage
        chunk if asked, [DONE]. Ended by shutdown: an error event, then [DONE]."""
        finishes: list[FinishEvent | None] = [None] * len(generations)
        try:
            for line in reply.opening(usage, len(generations)):
                yield line
            try:
                async for index, event in merged(generations):
                    if isinstance(event, FinishEvent):
                        finishes[index] = event
                        if event.reason not in FINISH:
                            error = ApiError(500, f"Generation failed: {event.error or event.reason}.",
                                             type="server_error")
                            yield f"data: {json.dumps(error.body())}\n\n"
                            yield "data: [DONE]\n\n"
                            return
                        held, called = reply.ending(index)
                        for delta in held:
                            yield reply.chunk(None, [], None, usage, index=index, delta=delta)
                        reason = "tool_calls" if called and event.reason in ("eos", "stop") else FINISH[event.reason]
                        yield reply.chunk(None, [], reason, usage, index=index)
                        continue
                    if not (event.text or reply.logprobs is not None or reply.token_ids):
                        continue
                    deltas = reply.pieces(index, event.text) if event.text else [reply.delta(event.text, False)]
                    if not deltas and (reply.logprobs is not None or reply.token_ids):
                        deltas = [reply.delta(None, False)]
                    for number, delta in enumerate(deltas):
                        yield reply.chunk(None, [event] if number == 0 else [], None, usage, index=index, delta=delta)
            except ShuttingDown:
                yield f"data: {json.dumps(shutting_down_error().body())}\n\n"
                yield "data: [DONE]\n\n"
                return
            if usage:
                yield reply.usage_chunk([f for f in finishes if f is not None])
            yield "data: [DONE]\n\n"
        finally:
            for generation in generations:
                generation.cancel()  # the client went away (this generator was cancelled or closed): free the slot


async def merged(generations: list[Generation]) -> AsyncIterator[tuple[int, TokenEvent | FinishEvent]]:
    """The events of several generations as they come, each with its generation's index."""
    if len(generations) == 1:  # the common case, without tasks
        events = generations[0].events()
        try:
            async for event in events:
                yield 0, event
        finally:
            await events.aclose()
        return
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

    async def pump(index: int, generation: Generation) -> None:
        try:
            async for event in generation.events():
                await queue.put((index, event))
        except ShuttingDown as error:
            await queue.put((index, error))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(generations)]
    try:
        left = len(generations)
        while left:
            index, event = await queue.get()
            if isinstance(event, ShuttingDown):
                raise event
            if isinstance(event, FinishEvent):
                left -= 1
            yield index, event
    finally:
        for task in tasks:
            task.cancel()


def shown(text: str, limit: int = 100) -> str:
    """Client text quoted in a message, cut short: an error must not echo megabytes back."""
    return text if len(text) <= limit else text[:limit] + "..."
