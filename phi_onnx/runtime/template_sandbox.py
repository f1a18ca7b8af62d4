"""The bounded Jinja sandbox chat templates render in: a template comes from the model folder, so it is
untrusted code.

The environment copies transformers' `apply_chat_template` one (jinja2's immutable sandbox with
trim_blocks/lstrip_blocks, loop controls, its `tojson`, `raise_exception` and `strftime_now`) so the
prompt text is byte-identical. Besides the sandbox (no access to Python internals), a render is
bounded in time (`RENDER_SECONDS`, enforced by a watchdog that raises inside the render) and in size
(`MAX_RENDER_CHARS` for the output, for `*`/`+`/`%`/`~` results and for size arguments such as a
`center` width; `range` is capped by the sandbox). `compile_template` and `render_bounded` are what
`phi_onnx.runtime.chat.ChatTemplate` uses; the exceptions say which bound a render broke.
"""

from __future__ import annotations

import ctypes
import functools
import json
import re
import threading
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

#: A render taking longer than this is stopped (chat templates render in well under a millisecond).
RENDER_SECONDS = 2.0
#: The most characters a render (or any string/list it builds) may reach: ~1M tokens, beyond any context.
MAX_RENDER_CHARS = 4_000_000
_LONG_FIELD = re.compile(r"\d{7,}")  # a format width/precision of millions of characters


class RenderTimeout(Exception):
    """Raised inside a render by the watchdog."""


class TemplateRefusal(Exception):
    """The template's own raise_exception(): it refused the messages (wrong roles, order, ...)."""


class TooLarge(Exception):
    """The template tried to build something larger than MAX_RENDER_CHARS."""


def _size(value: Any) -> int:
    return len(value) if isinstance(value, (str, bytes, list, tuple)) else 0


def _check_args(args: Sequence[Any], kwargs: dict[str, Any], limit: int = MAX_RENDER_CHARS) -> None:
    """Refuse size arguments (a width, a count) that would build a huge string before any check sees it."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > limit:
            raise TooLarge(f"a size argument of {value}")


def _bounded(func: Callable[..., Any], name: str, limit: int = MAX_RENDER_CHARS) -> Callable[..., Any]:
    """`func` (a filter) with its size arguments (at most `limit`) and its result checked."""

    @functools.wraps(func)  # keeps jinja's pass_context/pass_eval_context marks
    def run(*args: Any, **kwargs: Any) -> Any:
        _check_args(args, kwargs, limit)
        if name in ("replace", "indent"):
            _check_amplification(name, args, kwargs)
        result = func(*args, **kwargs)
        if _size(result) > MAX_RENDER_CHARS:
            raise TooLarge(f"the {name} filter's result ({_size(result)} items)")
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
        raise TooLarge(f"a {name} of about {estimate} characters")


@functools.lru_cache(maxsize=8)
def compile_template(source: str) -> Any:
    """The template compiled in the bounded sandbox (cached: a model renders one template again and again)."""
    import jinja2
    import jinja2.ext
    from jinja2.compiler import CodeGenerator
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateRefusal(message)

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
                raise TooLarge(f"a ~ concatenation of {sum(map(len, texts))} characters")
            return "".join(texts)

        # Intercepted operators are also not constant-folded at compile time ('a' * 10**10 included).
        intercepted_binops = frozenset({"*", "**", "+", "%"})

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            if operator == "*":
                count = right if isinstance(right, int) else left if isinstance(left, int) else 0
                if count > 0 and max(_size(left), _size(right)) * count > MAX_RENDER_CHARS:
                    raise TooLarge(f"{max(_size(left), _size(right))} items repeated {count} times")
            elif operator == "**":
                if isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and \
                        right * max(abs(left).bit_length(), 1) > 64 * 1024:
                    raise TooLarge(f"{left} ** {right}")
            elif operator == "+":
                if _size(left) + _size(right) > MAX_RENDER_CHARS:
                    raise TooLarge(f"a concatenation of {_size(left) + _size(right)} items")
            elif operator == "%" and isinstance(left, str):
                _check_args(right if isinstance(right, tuple) else (right,), {})
                if _LONG_FIELD.search(left):
                    raise TooLarge("a format width of millions of characters")
            return super().call_binop(context, operator, left, right)

        def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
            _check_args(args, kwargs)
            owner = getattr(__obj, "__self__", None)
            if isinstance(owner, str) and getattr(__obj, "__name__", "") == "replace":
                _check_amplification("replace", (owner, *args), {})
            result = super().call(__context, __obj, *args, **kwargs)
            if _size(result) > MAX_RENDER_CHARS:
                raise TooLarge(f"a call result of {_size(result)} items")
            return result

        def wrap_str_format(self, value: Any) -> Any:
            owner = getattr(value, "__self__", None)  # str.format is wrapped here, at attribute access
            if isinstance(owner, str) and getattr(value, "__name__", "") in ("format", "format_map") \
                    and _LONG_FIELD.search(owner):
                raise TooLarge("a format width of millions of characters")
            return super().wrap_str_format(value)

    env = BoundedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.filters = {name: _bounded(func, name) for name, func in env.filters.items()}
    env.globals["raise_exception"] = raise_exception
    env.globals["lipsum"] = _bounded(env.globals["lipsum"], "lipsum", limit=100)  # n paragraphs of ~100 words
    env.globals["strftime_now"] = strftime_now
    return env.from_string(source)


def render_bounded(template: Any, variables: dict[str, Any]) -> str:
    """Render in this thread, stopped by a watchdog after RENDER_SECONDS and at MAX_RENDER_CHARS of output."""
    me = threading.get_ident()
    guard = threading.Lock()
    running = True

    def stop() -> None:
        with guard:  # only while the render runs: never raise into the caller's later code
            if running:
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(me), ctypes.py_object(RenderTimeout))

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
                    raise TooLarge(f"more than {MAX_RENDER_CHARS} characters of output")
                pieces.append(piece)
        finally:
            watchdog.cancel()
            with guard:
                running = False
    except RenderTimeout:
        pieces.clear()
        raise
    return "".join(pieces)
