"""Export options made from ExportOptions fields: every field (but library-only ones) is an option of
`phi-onnx export` and a key of a `phi-onnx build` recipe's variant, and a new field becomes both."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

import click
import pytest
from click.testing import CliRunner

import phi_onnx.cli.options as cli_options
import phi_onnx.verify.build as build
from phi_onnx.cli import export, main
from phi_onnx.cli.options import cli_field, export_options, to_export_options
from phi_onnx.cli.quantize import quantize
from phi_onnx.cli.run import chat, generate
from phi_onnx.cli.serve import serve
from phi_onnx.export.options import PRECISIONS, ExportOptions
from phi_onnx.verify.build import RecipeError, load_recipe, option_keys, parse_variant


def _options(command: click.Command) -> dict[str, click.Option]:
    return {p.name: p for p in command.params if isinstance(p, click.Option) and p.name}


def test_every_export_field_is_an_export_option_and_a_recipe_key() -> None:
    options = _options(export)
    keys = option_keys()
    for item in dataclasses.fields(ExportOptions):
        if not cli_field(item):
            assert item.name not in options and item.name not in keys
            continue
        assert item.name in options, item.name
        assert item.name in keys, item.name
        option = options[item.name]
        assert option.help == item.metadata["help"]
        if not option.multiple:
            assert option.default == item.default, item.name
            assert option.show_default == (item.default is not None), item.name
    # The spellings users know, unchanged.
    assert options["symmetric"].opts == ["--symmetric"] and options["symmetric"].secondary_opts == ["--asymmetric"]
    assert options["adapters"].opts == ["--adapter"] and options["adapters"].multiple
    assert options["adapters"].metavar == "NAME=PATH"
    assert options["block_size"].opts == ["--block-size"] and options["block_size"].type is click.INT
    assert list(options["algo"].type.choices) == ["rtn", "clip", "gptq"]
    assert list(options["lm_head_bits"].type.choices) == [4, 8]
    assert isinstance(options["accuracy_level"].type, click.IntRange)
    assert isinstance(options["calibration"].type, click.Path) and not options["calibration"].type.dir_okay
    assert isinstance(options["merge_adapter"].type, click.Path) and not options["merge_adapter"].type.file_okay


def test_quantize_takes_its_subset_with_the_same_defaults() -> None:
    options = _options(quantize)
    subset = {"algo", "block_size", "symmetric", "accuracy_level", "calibration", "calibration_tokens"}
    assert subset <= set(options) and not ({f.name for f in dataclasses.fields(ExportOptions)} - subset) & set(options)
    assert options["block_size"].default == 32 and options["algo"].default == "rtn"
    assert options["symmetric"].secondary_opts == ["--asymmetric"]
    assert "0 for fp16" in options["accuracy_level"].help  # quantize's own wording


@pytest.mark.parametrize("command", [export, serve, chat, generate])
def test_precision_choices_come_from_the_precision_literal(command: click.Command) -> None:
    assert tuple(_options(command)["precision"].type.choices) == PRECISIONS == ("fp32", "fp16", "int4")


def test_parsed_values_back_to_export_options() -> None:
    seen: dict[str, Any] = {}

    @click.command()
    @export_options()
    def toy(**values: Any) -> None:
        seen.update(values)

    result = CliRunner().invoke(toy, ["--lm-head-bits", "4", "--asymmetric", "--adapter", "a=./x", "--mix", "auto",
                                      "--mix-budget", "0.2", "--accuracy-level", "2"])
    assert result.exit_code == 0, result.output
    assert to_export_options(seen) == ExportOptions(lm_head_bits=4, symmetric=False, adapters=(("a", "./x"),),
                                                    mix="auto", mix_budget=0.2, accuracy_level=2)
    assert to_export_options({}) == ExportOptions()
    assert CliRunner().invoke(toy, ["--lm-head-bits", "5"]).exit_code == 2
    assert CliRunner().invoke(toy, ["--accuracy-level", "5"]).exit_code == 2


@pytest.mark.parametrize(("args", "message"), [
    (["--precision", "fp16"], "fp16 on CPU is refused"),
    (["--block-size", "48"], "Invalid int4 block size 48"),
    (["--adapter", "support="], "is not NAME=PATH"),
    (["--mix-budget", "0.2"], "A mix budget was given, but --mix is none"),
])
def test_invalid_export_options_exit_2_before_anything_is_written(tmp_path: Path, args: list[str],
                                                                   message: str) -> None:
    result = CliRunner().invoke(main, ["export", "tiny-phi3", "-o", str(tmp_path / "out"), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


@dataclasses.dataclass(frozen=True)
class _Wider(ExportOptions):
    """ExportOptions with one more option, and one more library-only field."""

    flavour: Literal["plain", "spicy"] = dataclasses.field(default="plain", metadata={"help": "How it tastes."})
    hook: int = dataclasses.field(default=0, metadata={"cli": False})


def test_a_new_field_becomes_an_option_and_a_recipe_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli_options, "ExportOptions", _Wider)
    monkeypatch.setattr(build, "ExportOptions", _Wider)
    seen: dict[str, Any] = {}

    @click.command()
    @export_options()
    def toy(**values: Any) -> None:
        seen.update(values)

    assert "How it tastes." in CliRunner().invoke(toy, ["--help"]).output
    assert "--hook" not in CliRunner().invoke(toy, ["--help"]).output
    assert CliRunner().invoke(toy, ["--flavour", "spicy"]).exit_code == 0
    assert to_export_options(seen) == _Wider(flavour="spicy")
    assert CliRunner().invoke(toy, ["--flavour", "sour"]).exit_code == 2  # the choices come from the Literal

    assert "flavour" in option_keys() and "hook" not in option_keys()
    assert parse_variant({"variant": "cpu-fp32", "flavour": "spicy"}) == _Wider(precision="fp32", flavour="spicy")
    with pytest.raises(RecipeError, match="Unknown variant option"):
        parse_variant({"variant": "cpu-fp32", "hook": 1})


def _recipe(tmp_path: Path, variant: dict[str, Any]) -> Path:
    import yaml

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"output": str(tmp_path / "out"),
                                    "models": [{"source": "tiny-phi3", "variants": [variant]}]}))
    return path


@pytest.mark.parametrize(("key", "value", "wanted"), [
    ("mix_budget", "lots", "a number or None"),
    ("lm_head_bits", "8", "a whole number or None"),
    ("embeddings", 8, "a string"),
    ("symmetric", "no", "True or False"),
])
def test_a_recipe_key_of_the_wrong_type_is_named(tmp_path: Path, key: str, value: Any, wanted: str) -> None:
    with pytest.raises(RecipeError) as caught:
        load_recipe(_recipe(tmp_path, {"variant": "cpu-int4-rtn-block-32", key: value}))
    assert f"ExportOptions.{key} must be {wanted}" in caught.value.message


def test_recipe_export_keys_and_paths_relative_to_the_recipe(tmp_path: Path) -> None:
    recipe = load_recipe(_recipe(tmp_path, {"variant": "cpu-int4-rtn-block-32", "algo": "gptq", "lm_head_bits": 4,
                                            "embeddings": "int4", "calibration": "cal.txt", "calibration_tokens": 512,
                                            "mix": "auto", "mix_budget": 0.2,
                                            "adapters": {"support": "adapters/support"}}))
    options = recipe.variants[0].options
    assert (options.algo, options.lm_head_bits, options.embeddings, options.mix, options.mix_budget) == \
        ("gptq", 4, "int4", "auto", 0.2)
    assert options.calibration == str(tmp_path / "cal.txt") and options.calibration_tokens == 512
    assert options.adapters == (("support", str(tmp_path / "adapters" / "support")),)
    absolute = load_recipe(_recipe(tmp_path, {"variant": "cpu-fp32", "merge_adapter": "/abs/adapter"}))
    assert absolute.variants[0].options.merge_adapter == "/abs/adapter"
