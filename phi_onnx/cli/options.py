"""Command-line options made from dataclass fields, so a new generation option is one field.

`generation_options` turns every `GenerationOptions` field into a click option (`top_k` → `--top-k`, its
type from the annotation, its help from the field's metadata); `generation_kwargs` turns the parsed
values back into the keyword arguments `Model.stream` and `GenerationOptions.from_kwargs` take.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable
from typing import Any, TypeVar

import click

from phi_onnx.runtime.options import GenerationOptions

F = TypeVar("F", bound=Callable[..., Any])


def dataclass_options(cls: type, **defaults: Any) -> Callable[[F], F]:
    """A decorator adding one click option per field of dataclass `cls`, in field order.

    An option is unset (None, or () for a tuple field, which becomes a repeatable option) unless
    `defaults` names it: then it gets that default, shown in --help. Help text comes from the field's
    `metadata["help"]`; a field whose metadata has `"cli": False` gets no option. A bool field is a flag.
    """
    hints = typing.get_type_hints(cls)
    unknown = set(defaults) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise TypeError(f"{cls.__name__} has no field(s) {', '.join(sorted(unknown))}")  # a bug, not user input

    def option(item: dataclasses.Field[Any]) -> Callable[[F], F]:
        kind = _click_type(hints[item.name])
        settings: dict[str, Any] = {"help": item.metadata.get("help")}
        if kind is bool:
            settings["is_flag"] = True
            settings["default"] = None
        elif kind is tuple:
            settings["multiple"] = True
        else:
            settings["type"] = kind
            settings["default"] = defaults.get(item.name)
            settings["show_default"] = item.name in defaults
        return click.option("--" + item.name.replace("_", "-"), **settings)

    def decorate(func: F) -> F:
        for item in reversed(dataclasses.fields(cls)):  # click lists options in the order they were applied last
            if item.metadata.get("cli", True):  # e.g. callables: library only
                func = option(item)(func)
        return func

    return decorate


def _click_type(annotation: Any) -> Any:
    """int, float or str for a plain (or Optional) annotation; `tuple` for tuple[str, ...]."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(arg for arg in typing.get_args(annotation) if arg is not type(None))
    if typing.get_origin(annotation) is tuple:
        return tuple
    if annotation in (int, float, str, bool):
        return annotation
    raise TypeError(f"no command-line type for {annotation!r}")  # a new field of a kind not handled here


class FiniteFloat(click.FloatRange):
    """A float option that must be a finite number within the range given (click.FloatRange lets nan through:
    every comparison with nan is false, so `nan` passes any bound, and `inf` passes a lower one)."""

    name = "number"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        """Parse `value`, refuse nan and ±inf, then check the range."""
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return super().convert(number, param, ctx)


def generation_options(default_max_new: int) -> Callable[[F], F]:
    """The sampling options of `generate` and `chat`, one per GenerationOptions field."""
    return dataclass_options(GenerationOptions, max_new_tokens=default_max_new)


def generation_kwargs(values: dict[str, Any]) -> dict[str, Any]:
    """The sampling options given on the command line (unset ones, None or an empty --stop, left out)."""
    names = {item.name for item in dataclasses.fields(GenerationOptions)}
    return {key: value for key, value in values.items() if key in names and value is not None and value != ()}


def to_generation_options(values: dict[str, Any]) -> GenerationOptions:
    """The GenerationOptions the parsed command-line values describe (validated: OptionsError if not)."""
    return GenerationOptions.from_kwargs(None, **generation_kwargs(values))


class ThreadCount(click.ParamType):
    """`--threads`: a whole number from 1 to what `phi_onnx.runtime.providers.check_threads` allows here
    (4 per CPU core), checked while parsing, so `--threads 1000000` is a usage error (exit 2) before
    anything is loaded or exported."""

    name = "integer"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        """The thread count, or a click usage error naming the limit."""
        from phi_onnx.errors import OptionsError
        from phi_onnx.runtime.providers import check_threads

        count = click.INT.convert(value, param, ctx)
        if count < 1:
            self.fail(f"{count} is not a thread count (at least 1; leave --threads out for the default).", param, ctx)
        try:
            check_threads(count, "the thread count")
        except OptionsError as error:
            self.fail(f"{error.message} {error.hint}", param, ctx)
        return count


#: The type of every command's --threads.
THREADS = ThreadCount()
