"""Chat: the model's own template rendered as transformers renders it, history, and trimming.

Rendering copies transformers' `apply_chat_template` environment (jinja2's immutable sandbox with
trim_blocks/lstrip_blocks, loop controls, its `tojson`, `raise_exception` and `strftime_now`, and
the tokenizer's named special tokens as variables) so the prompt text is byte-identical; the
rendered text is then encoded without adding special tokens, as transformers does.

A template comes from the model folder, so it is untrusted code: besides the sandbox (no access
to Python internals), a render is bounded in time (`RENDER_SECONDS`, enforced by a watchdog that
raises inside the render) and in size (`MAX_RENDER_CHARS` for the output, for `*`/`+`/`%`/`~`
results and for size arguments such as a `center` width; `range` is capped by the sandbox).
A render that breaks a bound is refused with ModelFolderError; the "check the roles" hint is
kept for the template's own `raise_exception` (it refused the conversation).
"""

from __future__ import annotations

import ctypes
import functools
import json
import logging
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from phi_onnx.runtime.errors import ModelFolderError, OptionsError, PromptTooLongError
from phi_onnx.runtime.tokenizer import check_text

if TYPE_CHECKING:
    from phi_onnx.runtime.generation import GenerationResult, TextStream

log = logging.getLogger(__name__)

Message = dict[str, Any]

#: A render taking longer than this is stopped (chat templates render in well under a millisecond).
RENDER_SECONDS = 2.0
#: The most characters a render (or any string/list it builds) may reach: ~1M tokens, beyond any context.
MAX_RENDER_CHARS = 4_000_000
_LONG_FIELD = re.compile(r"\d{7,}")  # a format width/precision of millions of characters


class _RenderTimeout(Exception):
    """Raised inside a render by the watchdog."""


class _TemplateRefusal(Exception):
    """The template's own raise_exception(): it refused the messages (wrong roles, order, ...)."""


class _TooLarge(Exception):
    """The template tried to build something larger than MAX_RENDER_CHARS."""


def _size(value: Any) -> int:
    return len(value) if isinstance(value, (str, bytes, list, tuple)) else 0


def _check_args(args: Sequence[Any], kwargs: dict[str, Any], limit: int = MAX_RENDER_CHARS) -> None:
    """Refuse size arguments (a width, a count) that would build a huge string before any check sees it."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > limit:
            raise _TooLarge(f"a size argument of {value}")


def _bounded(func: Callable[..., Any], name: str, limit: int = MAX_RENDER_CHARS) -> Callable[..., Any]:
    """`func` (a filter) with its size arguments (at most `limit`) and its result checked."""

    @functools.wraps(func)  # keeps jinja's pass_context/pass_eval_context marks
    def run(*args: Any, **kwargs: Any) -> Any:
        _check_args(args, kwargs, limit)
        if name in ("replace", "indent"):
            _check_amplification(name, args, kwargs)
        result = func(*args, **kwargs)
        if _size(result) > MAX_RENDER_CHARS:
            raise _TooLarge(f"the {name} filter's result ({_size(result)} items)")
        return result

    return run


def _check_amplification(name: str, args: Sequence[Any], kwargs: dict[str, Any]) -> None:
    """`replace` and `indent` multiply their input's size: estimate the result before running them."""
    strings = [a for a in args if isinstance(a, str)]
    if name == "replace" and len(strings) >= 3:
        text, old, new = strings[-3:]
        estimate = len(text) + (text.count(old) if old else len(text) + 1) * len(new)
    elif name == "indent" and strings:
        width = next((a for a in [*args[1:2], kwargs.get("width")] if a is not None), 4)
        estimate = len(strings[0]) + (strings[0].count("\n") + 1) * (len(width) if isinstance(width, str)
                                                                      else int(width))
    else:
        return
    if estimate > MAX_RENDER_CHARS:
        raise _TooLarge(f"a {name} of about {estimate} characters")


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


@functools.lru_cache(maxsize=8)
def _compile(source: str) -> Any:
    import jinja2
    import jinja2.ext
    from jinja2.compiler import CodeGenerator
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise _TemplateRefusal(message)

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

    class BoundedCodeGenerator(CodeGenerator):
        """`a ~ b` (string concatenation) goes through `environment.bounded_concat`, which the sandbox
        does not intercept otherwise: a chain of `{% set b = a ~ a %}` doubles a string per line."""

        def visit_Concat(self, node: Any, frame: Any) -> None:
            self.write("environment.bounded_concat((")
            for arg in node.nodes:
                self.visit(arg, frame)
                self.write(", ")
            self.write("))")

    class BoundedEnvironment(ImmutableSandboxedEnvironment):
        """The sandbox, with the operators and calls that can build huge values checked first."""

        code_generator_class = BoundedCodeGenerator

        @staticmethod
        def bounded_concat(parts: Sequence[Any]) -> str:
            texts = [str(part) for part in parts]  # as jinja's str_join (no autoescape here)
            if sum(map(len, texts)) > MAX_RENDER_CHARS:
                raise _TooLarge(f"a ~ concatenation of {sum(map(len, texts))} characters")
            return "".join(texts)

        # Intercepted operators are also not constant-folded at compile time ('a' * 10**10 included).
        intercepted_binops = frozenset({"*", "**", "+", "%"})

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            if operator == "*":
                count = right if isinstance(right, int) else left if isinstance(left, int) else 0
                if count > 0 and max(_size(left), _size(right)) * count > MAX_RENDER_CHARS:
                    raise _TooLarge(f"{max(_size(left), _size(right))} items repeated {count} times")
            elif operator == "**":
                if isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and \
                        right * max(abs(left).bit_length(), 1) > 64 * 1024:
                    raise _TooLarge(f"{left} ** {right}")
            elif operator == "+":
                if _size(left) + _size(right) > MAX_RENDER_CHARS:
                    raise _TooLarge(f"a concatenation of {_size(left) + _size(right)} items")
            elif operator == "%" and isinstance(left, str):
                _check_args(right if isinstance(right, tuple) else (right,), {})
                if _LONG_FIELD.search(left):
                    raise _TooLarge("a format width of millions of characters")
            return super().call_binop(context, operator, left, right)

        def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
            _check_args(args, kwargs)
            owner = getattr(__obj, "__self__", None)
            if isinstance(owner, str) and getattr(__obj, "__name__", "") == "replace":
                _check_amplification("replace", (owner, *args), {})
            result = super().call(__context, __obj, *args, **kwargs)
            if _size(result) > MAX_RENDER_CHARS:
                raise _TooLarge(f"a call result of {_size(result)} items")
            return result

        def wrap_str_format(self, value: Any) -> Any:
            owner = getattr(value, "__self__", None)  # str.format is wrapped here, at attribute access
            if isinstance(owner, str) and getattr(value, "__name__", "") in ("format", "format_map") \
                    and _LONG_FIELD.search(owner):
                raise _TooLarge("a format width of millions of characters")
            return super().wrap_str_format(value)

    env = BoundedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.filters = {name: _bounded(func, name) for name, func in env.filters.items()}
    env.globals["raise_exception"] = raise_exception
    env.globals["lipsum"] = _bounded(env.globals["lipsum"], "lipsum", limit=100)  # n paragraphs of ~100 words
    env.globals["strftime_now"] = strftime_now
    return env.from_string(source)


def _render_bounded(template: Any, variables: dict[str, Any]) -> str:
    """Render in this thread, stopped by a watchdog after RENDER_SECONDS and at MAX_RENDER_CHARS of output."""
    me = threading.get_ident()
    guard = threading.Lock()
    running = True

    def stop() -> None:
        with guard:  # only while the render runs: never raise into the caller's later code
            if running:
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(me), ctypes.py_object(_RenderTimeout))

    watchdog = threading.Timer(RENDER_SECONDS, stop)
    watchdog.daemon = True
    pieces: list[str] = []
    total = 0
    try:
        try:
            watchdog.start()
            for piece in template.generate(**variables):
                total += len(piece)
                if total > MAX_RENDER_CHARS:
                    raise _TooLarge(f"more than {MAX_RENDER_CHARS} characters of output")
                pieces.append(piece)
        finally:
            watchdog.cancel()
            with guard:
                running = False
    except _RenderTimeout:
        pieces.clear()
        raise
    return "".join(pieces)


class ChatTemplate:
    """A chat template and the special-token variables it may use."""

    def __init__(self, source: str, special_tokens: dict[str, str] | None = None) -> None:
        import jinja2

        try:
            self._template = _compile(source)
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
            return _render_bounded(self._template, variables)
        except _TemplateRefusal as error:
            raise OptionsError(
                f"The model's chat template refused these messages: {error}",
                hint="Check the roles and their order (some templates forbid a system role).") from error
        except _RenderTimeout as error:
            raise ModelFolderError(f"The chat template ran for more than {RENDER_SECONDS:g} s and was stopped.",
                                   hint=f"It loops far too much (nested loops?). {fix}") from error
        except (_TooLarge, MemoryError) as error:
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

