"""Command-line options made from dataclass fields, so a new generation or export option is one field.

`generation_options` turns every `GenerationOptions` field into a click option (`top_k` → `--top-k`, its
type from the annotation, its help from the field's metadata); `generation_kwargs` turns the parsed
values back into the keyword arguments `Model.stream` and `GenerationOptions.from_kwargs` take.
`export_options` and `to_export_options` do the same for `ExportOptions` (`export`, `quantize`).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable
from typing import Any, TypeVar

import click

from phi_onnx.export.options import ExportOptions
from phi_onnx.runtime.options import GenerationOptions

F = TypeVar("F", bound=Callable[..., Any])


def dataclass_options(cls: type, *, field_defaults: bool = False, only: tuple[str, ...] | None = None,
                      helps: dict[str, str] | None = None, **defaults: Any) -> Callable[[F], F]:
    """A decorator adding one click option per field of dataclass `cls`, in field order.

    An option is unset (None, or () for a tuple field, which becomes a repeatable option) unless
    `defaults` names it, or `field_defaults` is set and the field's default is not None: then it gets
    that default, shown in --help. Help text comes from the field's `metadata["help"]` (or `helps`); a
    field whose metadata has `"cli": False` gets no option, nor does one left out of `only`. A bool field
    is a flag (`metadata["flag"]` names its on/off pair, e.g. "--symmetric/--asymmetric"). The type is
    the annotation's: a Literal is a choice; metadata may say `"choices"`, `"range"` (ints, both ends
    included), `"path"` ("file" or "dir"), `"option"` (another name), `"metavar"`, `"multiple"`.
    """
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = (set(defaults) | set(only or ()) | set(helps or {})) - names
    if unknown:
        raise TypeError(f"{cls.__name__} has no field(s) {', '.join(sorted(unknown))}")  # a bug, not user input

    def option(item: dataclasses.Field[Any]) -> Callable[[F], F]:
        meta = item.metadata
        settings: dict[str, Any] = {"help": (helps or {}).get(item.name, meta.get("help"))}
        if "metavar" in meta:
            settings["metavar"] = meta["metavar"]
        default = defaults.get(item.name, item.default if field_defaults else None)
        if default is dataclasses.MISSING:
            default = None
        name = meta.get("option", "--" + item.name.replace("_", "-"))
        kind = _click_type(hints[item.name]) if "path" not in meta or meta.get("multiple") else str
        if kind is bool:
            if "flag" in meta:
                name = meta["flag"]
            else:
                settings["is_flag"] = True
            settings["default"] = default
            settings["show_default"] = default is not None and "flag" in meta
        elif kind is tuple or meta.get("multiple"):
            settings["multiple"] = True
        else:
            settings["type"] = _param_type(kind, meta)
            settings["default"] = default
            settings["show_default"] = default is not None
        return click.option(name, item.name, **settings)

    def decorate(func: F) -> F:
        for item in reversed(dataclasses.fields(cls)):  # click lists options in the order they were applied last
            if cli_field(item) and (only is None or item.name in only):
                func = option(item)(func)
        return func

    return decorate


def cli_field(item: dataclasses.Field[Any]) -> bool:
    """Whether a dataclass field is a command-line option (and an ExportOptions field a recipe key): all but
    those whose metadata says `"cli": False` (e.g. callables: library only)."""
    return bool(item.metadata.get("cli", True))


def _param_type(kind: Any, meta: Any) -> Any:
    """The click type of a single-valued option of Python type (or Literal choices) `kind`."""
    if "choices" in meta:
        return click.Choice(meta["choices"])
    if "range" in meta:
        return click.IntRange(*meta["range"])
    if meta.get("path") == "file":
        return click.Path(dir_okay=False)
    if meta.get("path") == "dir":
        return click.Path(file_okay=False)
    if isinstance(kind, Choices):
        return click.Choice(kind)
    return kind


class Choices(tuple):  # type: ignore[type-arg]
    """A Literal annotation's values: a click choice."""


def _click_type(annotation: Any) -> Any:
    """int, float, str or bool for a plain (or Optional) annotation; `Choices` for a Literal; `tuple` for
    tuple[str, ...]."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(arg for arg in typing.get_args(annotation) if arg is not type(None))
    if typing.get_origin(annotation) is tuple:
        return tuple
    if typing.get_origin(annotation) is typing.Literal:
        return Choices(typing.get_args(annotation))
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


def export_options(*, only: tuple[str, ...] | None = None, helps: dict[str, str] | None = None
                   ) -> Callable[[F], F]:
    """The options of `export` (or, with `only`, a subset: `quantize`'s), one per ExportOptions field, with the
    dataclass's defaults."""
    return dataclass_options(ExportOptions, field_defaults=True, only=only, helps=helps)


def to_export_options(values: dict[str, Any]) -> ExportOptions:
    """The ExportOptions the parsed command-line values describe (fields not given keep their defaults;
    validated by ExportOptions: OptionsError, and AdapterError for a bad --adapter, if not)."""
    kwargs: dict[str, Any] = {}
    for item in dataclasses.fields(ExportOptions):
        if not cli_field(item) or item.name not in values or values[item.name] is None:
            continue
        parse = item.metadata.get("from_cli")
        kwargs[item.name] = parse(values[item.name]) if parse else values[item.name]
    return ExportOptions(**kwargs)


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
