"""POST /v1/responses: OpenAI's Responses API, stateless, over the chat endpoint's machinery.

A request becomes a chat request (`ResponsesRequest.chat_body`: `instructions` as the developer message,
message items as messages, `function_call` items as the assistant's tool_calls, `function_call_output`
items as `role: "tool"` messages, `text.format` as response_format, function tools as tools), is
prepared and submitted as chat requests are, and the reply is answered as a `response` object: a
`message` output item with `output_text`, and one `function_call` item per tool call; or streamed as
the Responses events (response.created, response.in_progress, response.output_item.added,
response.content_part.added, response.output_text.delta/done, response.content_part.done,
response.function_call_arguments.delta/done, response.output_item.done, then response.completed, or
response.incomplete when max_output_tokens cut the reply). Nothing is stored (`store: true` and
`previous_response_id` are 400s): a client sends the whole conversation each time.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from phi_onnx.runtime.scheduler import FinishEvent, TokenEvent
from phi_onnx.runtime.tools import ToolCallDelta, ToolCallStream, parse_tool_calls
from phi_onnx.serve.engine_client import Generation, ShuttingDown, shutting_down_error
from phi_onnx.serve.schema import ApiError, ChatRequest, ResponsesRequest, parse
from phi_onnx.serve.serving_chat import OpenAIServingChat
from phi_onnx.serve.serving_engine import FINISH


def _id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex


class ResponseObject:
    """The `response` object of one request, and its stream events (each numbered)."""

    def __init__(self, body: ResponsesRequest, name: str, tool_format: str | None, structured: bool = False,
                 tool_names: tuple[str, ...] = ()) -> None:
        self.body, self.name, self.tool_format = body, name, tool_format
        self.structured = structured  # text.format with tools: the text answer is JSON (parse_tool_calls)
        self.tool_names = tool_names  # the tools offered (parse_tool_calls' names)
        self.id = _id("resp_")
        self.created = int(time.time())
        self.sequence = 0

    def usage(self, finish: FinishEvent) -> dict[str, Any]:
        return {"input_tokens": finish.prompt_tokens,
                "input_tokens_details": {"cached_tokens": finish.cached_tokens, "cache_write_tokens": 0},
                "output_tokens": finish.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": finish.prompt_tokens + finish.completion_tokens}

    def tools(self) -> list[dict[str, Any]]:
        return [{"type": "function", "name": t.name, "description": t.description, "parameters": t.parameters,
                 "strict": t.strict} for t in self.body.tools or ()]

    def text_config(self) -> dict[str, Any]:
        fmt = self.body.text.format if self.body.text is not None else None
        if fmt is None:
            return {"format": {"type": "text"}}
        return {"format": fmt.model_dump(by_alias=True, exclude_none=True)}

    def envelope(self, status: str, output: list[dict[str, Any]], finish: FinishEvent | None = None
                 ) -> dict[str, Any]:
        """The response object with `status` and `output` (usage once finished)."""
        choice = self.body.tool_choice
        return {
            "id": self.id, "object": "response", "created_at": self.created, "status": status,
            "completed_at": int(time.time()) if status == "completed" else None, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": self.body.instructions, "max_output_tokens": self.body.max_output_tokens,
            "model": self.name, "output": output, "parallel_tool_calls": self.body.parallel_tool_calls,
            "previous_response_id": None, "store": False, "temperature": self.body.temperature,
            "top_p": self.body.top_p, "text": self.text_config(),
            "tool_choice": choice.model_dump() if choice is not None and not isinstance(choice, str)
            else (choice or "auto"),
            "tools": self.tools(), "truncation": "disabled", "metadata": {},
            "usage": self.usage(finish) if finish is not None else None,
        }

    @staticmethod
    def status(finish: FinishEvent) -> str:
        return "incomplete" if finish.reason == "length" else "completed"

    def message(self, text: str, status: str, item_id: str | None = None) -> dict[str, Any]:
        return {"id": item_id or _id("msg_"), "type": "message", "role": "assistant", "status": status,
                "content": [self.text_part(text)] if status != "in_progress" else []}

    @staticmethod
    def text_part(text: str) -> dict[str, Any]:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    @staticmethod
    def function_call(call_id: str, name: str, arguments: str, status: str, item_id: str | None = None
                      ) -> dict[str, Any]:
        return {"id": item_id or _id("fc_"), "type": "function_call", "call_id": call_id, "name": name,
                "arguments": arguments, "status": status}

    def whole(self, finish: FinishEvent) -> dict[str, Any]:
        """The non-streaming response."""
        status = self.status(finish)
        content, calls = (finish.text, [])
        if self.tool_format is not None and finish.reason in ("eos", "stop"):
            content, calls = parse_tool_calls(finish.text, self.tool_format, structured=self.structured,
                                              names=self.tool_names)
        output: list[dict[str, Any]] = []
        if content or not calls:
            output.append(self.message(content or "", status))
        output.extend(self.function_call(c.id, c.name, c.arguments, "completed") for c in calls)
        return self.envelope(status, output, finish)

    def event(self, kind: str, **fields: Any) -> str:
        """One SSE event (`event:` and `data:` lines), numbered."""
        data = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {kind}\ndata: {json.dumps(data)}\n\n"


class _StreamState:
    """The output items a streamed response has opened, and the events that open, fill and close them."""

    def __init__(self, reply: ResponseObject) -> None:
        self.reply = reply
        self.output: list[dict[str, Any]] = []  # finished items
        self.text_item: tuple[str, int, list[str]] | None = None  # (id, output_index, text pieces)
        self.calls: dict[int, tuple[str, int, str, str, list[str]]] = {}  # index -> (item id, out, call id, name, args)
        self.open_call: int | None = None

    def _index(self) -> int:
        return len(self.output) + (self.text_item is not None) + (self.open_call is not None)

    def text(self, piece: str) -> list[str]:
        if not piece:
            return []
        events = self.close_call()
        reply = self.reply
        if self.text_item is None:
            item_id, index = _id("msg_"), self._index()
            self.text_item = (item_id, index, [])
            events.append(reply.event("response.output_item.added", output_index=index,
                                      item=reply.message("", "in_progress", item_id)))
            events.append(reply.event("response.content_part.added", item_id=item_id, output_index=index,
                                      content_index=0, part=reply.text_part("")))
        item_id, index, pieces = self.text_item
        pieces.append(piece)
        events.append(reply.event("response.output_text.delta", item_id=item_id, output_index=index,
                                  content_index=0, delta=piece, logprobs=[]))
        return events

    def close_text(self, status: str = "completed") -> list[str]:
        if self.text_item is None:
            return []
        reply, (item_id, index, pieces) = self.reply, self.text_item
        text = "".join(pieces)
        self.text_item = None
        item = reply.message(text, status, item_id)
        self.output.append(item)
        return [reply.event("response.output_text.done", item_id=item_id, output_index=index, content_index=0,
                            text=text, logprobs=[]),
                reply.event("response.content_part.done", item_id=item_id, output_index=index, content_index=0,
                            part=reply.text_part(text)),
                reply.event("response.output_item.done", output_index=index, item=item)]

    def call(self, delta: ToolCallDelta) -> list[str]:
        reply = self.reply
        events: list[str] = []
        if delta.id is not None:
            events += self.close_text()
            events += self.close_call()
            item_id, index = _id("fc_"), self._index()
            self.calls[delta.index] = (item_id, index, delta.id, delta.name or "", [])
            self.open_call = delta.index
            events.append(reply.event("response.output_item.added", output_index=index,
                                      item=reply.function_call(delta.id, delta.name or "", "", "in_progress",
                                                               item_id)))
        if delta.arguments and delta.index in self.calls:
            item_id, index, _, _, pieces = self.calls[delta.index]
            pieces.append(delta.arguments)
            events.append(reply.event("response.function_call_arguments.delta", item_id=item_id,
                                      output_index=index, delta=delta.arguments))
        return events

    def close_call(self, status: str = "completed") -> list[str]:
        if self.open_call is None:
            return []
        reply = self.reply
        item_id, index, call_id, name, pieces = self.calls[self.open_call]
        self.open_call = None
        arguments = "".join(pieces)
        item = reply.function_call(call_id, name, arguments, status, item_id)
        self.output.append(item)
        return [reply.event("response.function_call_arguments.done", item_id=item_id, output_index=index,
                            arguments=arguments),
                reply.event("response.output_item.done", output_index=index, item=item)]


class OpenAIServingResponses(OpenAIServingChat):
    """The Responses endpoint: the request as a chat request, the answer as a `response` (or its events)."""

    param = "input"

    async def create(self, request: Request, body: ResponsesRequest) -> Response:  # type: ignore[override]
        """Answer one parsed Responses request."""
        loaded, _ = self.client.engine()
        chat: ChatRequest = parse(ChatRequest, body.chat_body())
        name = self.check_model(chat)
        self.check_length(chat.characters(), self.max_tokens(chat))
        prepared = await asyncio.to_thread(self.prepare, loaded, chat)
        generations = self.submit(chat, [prepared.prompt], prepared.processors)
        reply = ResponseObject(body, name, prepared.tool_format, prepared.structured, prepared.tool_names)
        if body.stream:
            return StreamingResponse(self.events(generations[0], reply), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        results = await self.collect(request, generations)
        if results is None:
            return Response(status_code=499)  # the client went away; nobody reads this
        return JSONResponse(reply.whole(results[0][1]))

    async def events(self, generation: Generation, reply: ResponseObject) -> AsyncIterator[str]:
        """The Responses stream: created, in_progress, the items' events, then completed (or incomplete)."""
        events = generation.events()
        state = _StreamState(reply)
        parser = ToolCallStream(reply.tool_format, structured=reply.structured, names=reply.tool_names) \
            if reply.tool_format is not None else None
        try:
            yield reply.event("response.created", response=reply.envelope("in_progress", []))
            yield reply.event("response.in_progress", response=reply.envelope("in_progress", []))
            try:
                async for event in events:
                    if isinstance(event, FinishEvent):
                        break
                    assert isinstance(event, TokenEvent)
                    if not event.text:
                        continue
                    for piece in parser.push(event.text) if parser is not None else (event.text,):
                        for line in state.text(piece) if isinstance(piece, str) else state.call(piece):
                            yield line
            except ShuttingDown:
                error = shutting_down_error()
                yield reply.event("error", code=error.code, message=error.message, param=None)
                return
            if event.reason not in FINISH:
                error = ApiError(500, f"Generation failed: {event.error or event.reason}.", type="server_error")
                yield reply.event("error", code="server_error", message=error.message, param=None)
                return
            status = reply.status(event)
            if parser is not None:
                for piece in parser.finish():
                    for line in state.text(piece) if isinstance(piece, str) else state.call(piece):
                        yield line
            for line in [*state.close_text(status), *state.close_call(status)]:
                yield line
            if not state.output:  # an empty reply is still one (empty) message, as non-streaming has it
                item = reply.message("", status)
                yield reply.event("response.output_item.added", output_index=0,
                                  item={**item, "status": "in_progress", "content": []})
                yield reply.event("response.output_item.done", output_index=0, item=item)
                state.output.append(item)
            final = reply.envelope(status, state.output, event)
            yield reply.event("response.completed" if status == "completed" else "response.incomplete",
                              response=final)
        finally:
            await events.aclose()
            generation.cancel()  # the client went away: free the slot
