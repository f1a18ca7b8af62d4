"""Chat: the model's own template rendered as transformers renders it, history, and trimming.

Rendering copies transformers' `apply_chat_template` environment (jinja2's immutable sandbox with
trim_blocks/lstrip_blocks, loop controls, its `tojson`, `raise_exception` and `strftime_now`, and
the tokenizer's named special tokens as variables) so the prompt text is byte-identical; the
rendered text is then encoded without adding special tokens, as transformers does.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from phi_onnx.runtime.errors import ModelFolderError, OptionsError

if TYPE_CHECKING:
    from phi_onnx.runtime.generation import GenerationResult, TextStream
    from phi_onnx.runtime.model import Model

Message = dict[str, Any]


def load_chat_template(folder: Path, config: dict[str, Any]) -> str | None:
    """The default chat template: chat_template.jinja wins over tokenizer_config.json (as in transformers)."""
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {item.get("name"): item.get("template") for item in template if isinstance(item, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


@functools.lru_cache(maxsize=8)
def _compile(source: str) -> Any:
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        # transformers replaces jinja's tojson, which HTML-escapes, with plain json.dumps
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    class Generation(jinja2.ext.Extension):
        """Accepts transformers' `{% generation %}` blocks (assistant masks) and renders their body."""

        tags = {"generation"}  # noqa: RUF012 - jinja2 reads a class attribute

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Callable[[], str]) -> str:
            return caller()

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(source)


class ChatTemplate:
    """A chat template and the special-token variables it may use."""

    def __init__(self, source: str, special_tokens: dict[str, str] | None = None) -> None:
        import jinja2

        try:
            self._template = _compile(source)
        except jinja2.TemplateError as error:
            raise ModelFolderError(
                f"The chat template does not parse ({error}).",
                hint="Fix chat_template in tokenizer_config.json (or chat_template.jinja).") from error
        self.source = source
        self.special_tokens = dict(special_tokens or {})

    def render(self, messages: Sequence[Message], *, add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """The prompt text for `messages` ([{"role", "content"}]), ending with the assistant header."""
        import jinja2

        check_messages(messages)
        # transformers drops None-valued keys (OpenAI-style content=None) before rendering
        plain = [{k: v for k, v in message.items() if v is not None} for message in messages]
        try:
            return str(self._template.render(messages=plain, tools=None, documents=None,
                                             add_generation_prompt=add_generation_prompt,
                                             **{**self.special_tokens, **kwargs}))
        except jinja2.TemplateError as error:
            raise OptionsError(
                f"The model's chat template refused these messages: {error}",
                hint="Check the roles and their order (some templates forbid a system role).") from error


def check_messages(messages: Sequence[Message]) -> None:
    """Raise OptionsError unless `messages` is a non-empty list of {"role": str, "content": ...} dicts."""
    if not messages:
        raise OptionsError("The conversation is empty.", hint='Pass e.g. [{"role": "user", "content": "Hi"}].')
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or "content" not in message:
            raise OptionsError(f"Message {i} is not a {{'role': ..., 'content': ...}} dict: {message!r}.",
                               hint='Each message needs a "role" (system, user or assistant) and a "content".')


def trim_history(messages: Sequence[Message], count: Callable[[Sequence[Message]], int],
                 budget: int) -> tuple[list[Message], int]:
    """Drop the oldest turns (never the system prompt or the last message) until `count(...) <= budget`.

    Whole exchanges go together: after dropping, the kept history starts at a user message.
    Returns (kept messages, number dropped). The result may still be over budget when even the last
    message alone does not fit; the caller reports that with the numbers.
    """
    system = [m for m in messages[:1] if m.get("role") == "system"]
    turns = list(messages[len(system):])
    dropped = 0
    while len(turns) > 1 and count(system + turns) > budget:
        turns.pop(0)
        dropped += 1
        while len(turns) > 1 and turns[0].get("role") != "user":
            turns.pop(0)
            dropped += 1
    return system + turns, dropped


@dataclass
class ChatSession:
    """A conversation with history: `send()` / `stream()` add the user turn and the model's reply.

    When the history no longer fits the context (prompt plus room for the reply), the oldest turns
    are dropped; `dropped` on the session (and a warning log) tells how many.
    """

    model: Model
    system: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    history: list[Message] = field(default_factory=list)
    dropped: int = 0

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.history.clear()
        self.dropped = 0

    def set_system(self, text: str | None) -> None:
        """Replace the system prompt (None or "" removes it); the history stays."""
        self.system = text or None

    def messages(self) -> list[Message]:
        """The system prompt (if any) followed by the history."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.history

    def send(self, text: str, **options: Any) -> GenerationResult:
        """Add a user turn and return the full reply (also added to the history)."""
        return self.stream(text, **options).finish()

    def stream(self, text: str, **options: Any) -> TextStream:
        """Add a user turn and stream the reply; the reply (even a stopped one) joins the history."""
        merged = {**self.options, **options}
        self.history.append({"role": "user", "content": text})
        try:
            messages, dropped = self.model.fit_chat(self.messages(), merged.get("max_new_tokens"))
        except BaseException:
            self.history.pop()
            raise
        if dropped:
            self.history = messages[1:] if self.system else messages
            self.dropped += dropped

        def finished(result: GenerationResult) -> None:
            if result.text or result.finish_reason != "interrupted":
                self.history.append({"role": "assistant", "content": result.text})
            elif self.history and self.history[-1]["role"] == "user":
                self.history.pop()  # stopped before any text: forget the question too

        try:
            stream = self.model.chat_stream(messages, **merged)
        except BaseException:
            self.history.pop()
            raise
        stream.on_finish(finished)
        stream.dropped_messages = dropped
        return stream

