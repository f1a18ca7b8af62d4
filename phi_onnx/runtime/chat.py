"""Chat: the model's own template rendered as transformers renders it, history, and trimming.

Rendering copies transformers' `apply_chat_template` environment (jinja2's immutable sandbox with
trim_blocks/lstrip_blocks, loop controls, its `tojson`, `raise_exception` and `strftime_now`, and
the tokenizer's named special tokens as variables) so the prompt text is byte-identical; the
rendered text is then encoded without adding special tokens, as transformers does.

A template comes from the model folder, so it is untrusted code: it renders in the bounded sandbox
of `phi_onnx.runtime.template_sandbox` (time and size limits). A render that breaks a bound is
refused with ModelFolderError; the "check the roles" hint is kept for the template's own
`raise_exception` (it refused the conversation).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from phi_onnx.runtime.errors import ModelFolderError, OptionsError, PromptTooLongError
from phi_onnx.runtime.template_sandbox import (
    MAX_RENDER_CHARS,
    RENDER_SECONDS,
    RenderTimeout,
    TemplateRefusal,
    TooLarge,
    compile_template,
    render_bounded,
)
from phi_onnx.runtime.tokenizer import check_text

if TYPE_CHECKING:
    from phi_onnx.runtime.generation import GenerationResult, TextStream

log = logging.getLogger(__name__)

Message = dict[str, Any]

def load_chat_template(folder: Path, config: dict[str, Any]) -> str | None:
    """The default chat template: chat_template.jinja wins over tokenizer_config.json (as in transformers)."""
    jinja_file = folder / "chat_template.jinja"
    try:
        if jinja_file.is_file():
            return jinja_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ModelFolderError(f"{jinja_file} cannot be read as UTF-8 text ({error}).",
                               hint="Copy chat_template.jinja from the source checkpoint again, or delete it to "
                                    "use tokenizer_config.json's chat_template.") from error
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {item.get("name"): item.get("template") for item in template if isinstance(item, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


class ChatTemplate:
    """A chat template and the special-token variables it may use."""

    def __init__(self, source: str, special_tokens: dict[str, str] | None = None) -> None:
        import jinja2

        try:
            self._template = compile_template(source)
        except (jinja2.TemplateError, RecursionError) as error:
            raise ModelFolderError(
                f"The chat template does not parse ({error}).",
                hint="Fix chat_template in tokenizer_config.json (or chat_template.jinja).") from error
        self.source = source
        self.special_tokens = dict(special_tokens or {})

    def render(self, messages: Sequence[Message], *, add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """The prompt text for `messages` ([{"role", "content"}]), ending with the assistant header.

        Raises:
            OptionsError: the messages are malformed, the template refused them (its raise_exception),
                or the template failed on them.
            ModelFolderError: the template ran past RENDER_SECONDS or MAX_RENDER_CHARS.
        """
        # transformers drops None-valued keys (OpenAI-style content=None) before rendering
        plain = [{k: v for k, v in message.items() if v is not None} for message in check_messages(messages)]
        variables = {"messages": plain, "tools": None, "documents": None,
                     "add_generation_prompt": add_generation_prompt, **self.special_tokens, **kwargs}
        fix = "Fix chat_template.jinja (or chat_template in tokenizer_config.json) in the model folder."
        try:
            return render_bounded(self._template, variables)
        except TemplateRefusal as error:
            raise OptionsError(
                f"The model's chat template refused these messages: {error}",
                hint="Check the roles and their order (some templates forbid a system role).") from error
        except RenderTimeout as error:
            raise ModelFolderError(f"The chat template ran for more than {RENDER_SECONDS:g} s and was stopped.",
                                   hint=f"It loops far too much (nested loops?). {fix}") from error
        except (TooLarge, MemoryError) as error:
            raise ModelFolderError(
                f"The chat template was stopped: {error or 'it ran out of memory'} is over the limit of "
                f"{MAX_RENDER_CHARS} characters, far more than any prompt.",
                hint=f"It multiplies or repeats text. {fix}") from error
        except Exception as error:  # jinja's errors, and whatever the template's Python operations raise
            raise OptionsError(
                f"The chat template failed on these messages ({type(error).__name__}: {error}).",
                hint="If the messages are what the model expects (e.g. text content, not a list of parts), "
                     f"the template is broken. {fix}") from error


def check_messages(messages: Any) -> list[Message]:
    """`messages` as a list, or OptionsError naming the first problem.

    A conversation is a non-empty list of dicts with string keys, each with a non-empty string "role"
    and a "content" that is text, None (e.g. an assistant turn holding only tool calls) or a list of
    content parts (dicts, for templates that take them).
    """
    example = 'Pass e.g. [{"role": "user", "content": "Hi"}].'
    if isinstance(messages, (str, bytes, dict)) or not isinstance(messages, Sequence):
        raise OptionsError(f"A conversation is a list of messages, not {type(messages).__name__}.", hint=example)
    if not messages:
        raise OptionsError("The conversation is empty.", hint=example)
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise OptionsError(f"Message {i} is {type(message).__name__}, not a {{'role': ..., 'content': ...}} dict.",
                               hint=example)
        if not all(isinstance(key, str) for key in message):
            raise OptionsError(f"Message {i} has a key that is not a string.", hint=example)
        role = message.get("role")
        if not isinstance(role, str) or not role.strip():
            raise OptionsError(f"Message {i} has no role (got {role!r}).",
                               hint='Each message needs a "role": "system", "user", "assistant" or "tool".')
        check_text(role, f"Message {i}'s role")  # before the role appears in the messages below
        if "content" not in message:
            raise OptionsError(f"Message {i} ({role}) has no content.", hint='Add "content": "..." to it.')
        content = message["content"]
        if not (content is None or isinstance(content, str)
                or (isinstance(content, list) and all(isinstance(part, dict) for part in content))):
            raise OptionsError(f"Message {i} ({role}) has content of type {type(content).__name__}.",
                               hint="Content is text (a string), or a list of content-part dicts.")
        _check_strings(message, f"Message {i}")
    return list(messages)


def _check_strings(message: Message, name: str) -> None:
    """OptionsError naming the first string in `message` (keys and nested parts too) that is not valid
    Unicode (a lone surrogate): the template would copy it into a prompt nothing can tokenize.

    Walks with a stack, not recursion, and visits each container once: a caller's deeply nested or
    self-containing content must not raise RecursionError or loop. Each item's place is kept as a link
    to its parent's (parent, key), so a deep walk stays linear; it is spelled out only for an error.
    """
    stack: list[tuple[Any, Any]] = [(message, None)]
    seen: set[int] = set()
    while stack:
        value, place = stack.pop()
        if isinstance(value, str):
            if not value.isascii():
                check_text(value, _describe(name, place))
        elif isinstance(value, (dict, list, tuple)) and id(value) not in seen:
            seen.add(id(value))
            items = list(value.items()) if isinstance(value, dict) else list(enumerate(value))
            for key, item in reversed(items):  # reversed: the first problem is the one reported
                stack.append((item, (place, key)))
                if isinstance(key, str) and not key.isascii():
                    stack.append((key, ((place, key), KEY)))


#: Marks a dict key in `_check_strings`' places: a key with a surrogate is named by where it is, not by itself.
KEY = object()


def _describe(name: str, place: Any) -> str:
    """ "Message 2's content[1].text" for the place (((None, "content"), 1), "text") below message 2."""
    path: list[Any] = []
    while place is not None:
        place, key = place
        path.append(key)
    path.reverse()
    if path and path[-1] is KEY:
        where = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in path[:-2]).lstrip(".")
        return f"A key in {name}'s {where}" if where else f"A key in {name}"
    where = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in path).lstrip(".")
    return f"{name}'s {where}" if where else name


def fit_chat(messages: Sequence[Message], prompt_tokens: Callable[[Sequence[Message]], int], context: int,
             max_new_tokens: int) -> tuple[list[Message], int]:
    """Drop the oldest turns until the prompt leaves room for a reply of max_new_tokens (at most half
    the context); returns (kept messages, number dropped) and logs a warning when it drops any.

    `prompt_tokens(messages)` is the rendered prompt's length in tokens.
    Raises PromptTooLongError when even the last message (with the system prompt) does not fit.
    """
    messages = check_messages(messages)
    reserve = min(max_new_tokens, context // 2)
    kept, dropped = trim_history(messages, prompt_tokens, context - reserve)
    prompt = prompt_tokens(kept)
    if prompt >= context:
        raise PromptTooLongError(
            f"The last message makes a {prompt}-token prompt; the model's context is {context} tokens.",
            hint="Send a shorter message (or use a shorter system prompt).")
    if dropped:
        log.warning("Dropped the %d oldest message(s) of the conversation to fit the %d-token context.",
                    dropped, context)
    return kept, dropped


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


class ChatModel(Protocol):
    """What a ChatSession needs of its model (phi_onnx.Model): chat.py does not import model.py."""

    def fit_chat(self, messages: Sequence[Message],
                 max_new_tokens: int | None = None) -> tuple[list[Message], int]: ...

    def chat_stream(self, messages: Sequence[Message], **options: Any) -> TextStream: ...


@dataclass
class ChatSession:
    """A conversation with history: `send()` / `stream()` add the user turn and the model's reply.

    When the history no longer fits the context (prompt plus room for the reply), the oldest turns
    are dropped; `dropped` on the session (and a warning log) tells how many.
    A session is one conversation: use it from one thread at a time (its model may be shared).
    """

    model: ChatModel
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
        if text is not None and not isinstance(text, str):
            raise OptionsError(f"The system prompt is text, not {type(text).__name__}.", hint="Pass a string.")
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
        if not isinstance(text, str):
            raise OptionsError(f"A chat message is text, not {type(text).__name__}.", hint="Pass a string.")
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

