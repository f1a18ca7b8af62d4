"""CLI options made from dataclass fields: every GenerationOptions field is an option of generate and chat."""

from __future__ import annotations

import dataclasses
from typing import Any

import click
import pytest
from click.testing import CliRunner

from phi_onnx.cli.options import dataclass_options, generation_kwargs, generation_options, to_generation_options
from phi_onnx.cli.run import chat, generate
from phi_onnx.errors import OptionsError
from phi_onnx.runtime.options import GenerationOptions


@pytest.mark.parametrize(("command", "default"), [(generate, 256), (chat, 512)])
def test_every_generation_field_is_an_option(command: click.Command, default: int) -> None:
    options = {p.name: p for p in command.params if isinstance(p, click.Option)}
    for item in dataclasses.fields(GenerationOptions):
        if not item.metadata.get("cli", True):  # library only (callables)
            assert item.name not in options
            continue
        assert item.name in options, item.name
        assert options[item.name].opts == ["--" + item.name.replace("_", "-")]
    assert options["max_new_tokens"].default == default and options["max_new_tokens"].show_default
    assert options["stop"].multiple and options["seed"].type is click.INT and options["top_p"].type is click.FLOAT
    assert options["top_k"].help == GenerationOptions.__dataclass_fields__["top_k"].metadata["help"]


def test_a_new_field_is_a_new_option() -> None:
    @dataclasses.dataclass(frozen=True)
    class Toy:
        width: int = dataclasses.field(default=3, metadata={"help": "How wide."})
        ratio: float | None = None
        words: tuple[str, ...] = ()

    seen: dict[str, Any] = {}

    @click.command()
    @dataclass_options(Toy, width=7)
    def toy(**values: Any) -> None:
        seen.update(values)

    result = CliRunner().invoke(toy, ["--ratio", "0.5", "--words", "a", "--words", "b"])
    assert result.exit_code == 0, result.output
    assert seen == {"width": 7, "ratio": 0.5, "words": ("a", "b")}
    assert "How wide." in CliRunner().invoke(toy, ["--help"]).output
    assert CliRunner().invoke(toy, ["--width", "x"]).exit_code == 2  # the type comes from the annotation


def test_parsed_values_back_to_generation_options() -> None:
    seen: dict[str, Any] = {}

    @click.command()
    @generation_options(default_max_new=64)
    def gen(**values: Any) -> None:
        seen.update(values)

    assert CliRunner().invoke(gen, ["--top-k", "5", "--stop", "END", "--temperature", "0.7"]).exit_code == 0
    assert generation_kwargs(seen) == {"max_new_tokens": 64, "top_k": 5, "stop": ("END",), "temperature": 0.7}
    options = to_generation_options(seen)
    assert options == GenerationOptions(max_new_tokens=64, top_k=5, stop=("END",), temperature=0.7)
    with pytest.raises(OptionsError, match="top_p"):
        to_generation_options({**seen, "top_p": 1.5})
