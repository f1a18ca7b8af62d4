"""`phi-onnx build RECIPE`: layout, summaries, skipping what is up to date, one failure not stopping the rest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from phi_onnx.cli import main
from phi_onnx.verify.build import RecipeError, Variant, load_recipe, parse_variant

FAST_VERIFY = {"new_tokens": 8, "text_tokens": 256, "window": 128}


def run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def write_recipe(path: Path, models: list[dict], **extra) -> Path:
    path.write_text(yaml.safe_dump({"output": str(path.parent / "out"), "verification": FAST_VERIFY,
                                    "variants": ["cpu-int4-rtn-block-32", "cuda-fp16"], "models": models, **extra}))
    return path


def summary(out: Path) -> dict[tuple[str, str], dict]:
    data = json.loads((out / "summary.json").read_text())
    return {(row["model"], row["variant"]): row for row in data["variants"]}


def test_two_models_two_variants_then_skip_then_rebuild_one(make_checkpoint, tmp_path):
    models = [{"name": "tiny", "source": "tiny-phi3"}, {"name": "p4m", "source": str(make_checkpoint("phi4mini"))}]
    recipe = write_recipe(tmp_path / "recipe.yaml", models)
    out = tmp_path / "out"

    result = run("build", str(recipe))
    assert result.exit_code == 0, result.output
    rows = summary(out)
    assert len(rows) == 4
    assert {row["status"] for row in rows.values()} == {"built"}
    assert {row["verification"] for row in rows.values()} == {"passed"}  # the CUDA variants verified on CPU ORT
    for model in ("tiny", "p4m"):  # the published repos' layout
        assert (out / model / "cpu_and_mobile" / "cpu-int4-rtn-block-32-acc-level-4" / "model.onnx").is_file()
        assert (out / model / "cuda" / "cuda-fp16" / "genai_config.json").is_file()
    table = (out / "summary.md").read_text()
    assert table.count("| yes |") == 4 and "4 of 4 variants passed" in table
    int4 = out / "tiny" / "cpu_and_mobile" / "cpu-int4-rtn-block-32-acc-level-4"
    stamp = (int4 / "model.onnx.data").stat().st_mtime_ns

    result = run("build", str(recipe))
    assert result.exit_code == 0, result.output
    rows = summary(out)
    assert {row["status"] for row in rows.values()} == {"skipped"}
    assert {row["verification"] for row in rows.values()} == {"reused-passed"}
    assert (int4 / "model.onnx.data").stat().st_mtime_ns == stamp

    models[1]["variants"] = ["cpu-int4-rtn-block-32", {"variant": "cuda-fp16", "max_length": 256}]
    write_recipe(recipe, models)
    result = run("build", str(recipe))
    assert result.exit_code == 0, result.output
    rows = summary(out)
    assert [key for key, row in rows.items() if row["status"] == "built"] == [("p4m", "cuda-fp16")]
    genai = json.loads((out / "p4m" / "cuda" / "cuda-fp16" / "genai_config.json").read_text())
    assert genai["search"]["max_length"] == 256


def test_a_failing_variant_does_not_stop_the_others(make_checkpoint, tmp_path):
    models = [{"name": "gone", "source": str(tmp_path / "no-such-checkpoint")},
              {"name": "gqa", "source": str(make_checkpoint("phi3-gqa")), "variants": ["cpu-fp32"]}]
    recipe = write_recipe(tmp_path / "recipe.yaml", models)
    result = run("build", str(recipe), "--json")
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    assert not data["passed"]
    rows = {(row["model"], row["variant"]): row for row in data["variants"]}
    assert rows[("gone", "cpu-int4-rtn-block-32-acc-level-4")]["status"] == "failed"
    assert "does not exist" in rows[("gone", "cuda-fp16")]["reason"]
    assert rows[("gqa", "cpu-fp32")]["passed"] and rows[("gqa", "cpu-fp32")]["verification"] == "passed"
    assert "1 of 3 variants passed" in (tmp_path / "out" / "summary.md").read_text()


def test_failed_verification_fails_the_build(make_checkpoint, tmp_path):
    models = [{"name": "gqa", "source": str(make_checkpoint("phi3-gqa")), "variants": ["cpu-fp32"]}]
    recipe = write_recipe(tmp_path / "recipe.yaml", models,
                          verification={**FAST_VERIFY, "thresholds": {"fp32": {"perplexity_change": -1}}})
    result = run("build", str(recipe))
    assert result.exit_code == 1
    row = summary(tmp_path / "out")[("gqa", "cpu-fp32")]
    assert row["status"] == "built" and row["verification"] == "failed" and "perplexity_change" in row["reason"]


@pytest.mark.parametrize(("spec", "expected", "folder"), [
    ("cpu-int4-rtn-block-32", {"precision": "int4", "device": "cpu", "block_size": 32, "symmetric": True,
                               "accuracy_level": 4}, "m/cpu_and_mobile/cpu-int4-rtn-block-32-acc-level-4"),
    ("cpu-int4-rtn-asym-block-128-acc-level-0", {"block_size": 128, "symmetric": False, "accuracy_level": 0},
     "m/cpu_and_mobile/cpu-int4-rtn-asym-block-128-acc-level-0"),
    ("cuda-int4-rtn-block-32", {"device": "cuda", "accuracy_level": 0}, "m/cuda/cuda-int4-rtn-block-32"),
    ("cuda-fp16", {"precision": "fp16", "device": "cuda"}, "m/cuda/cuda-fp16"),
    ({"variant": "cpu-fp32", "max_length": 512}, {"precision": "fp32", "max_length": 512}, "m/cpu_and_mobile/cpu-fp32"),
])
def test_variant_names(spec, expected, folder):
    options = parse_variant(spec)
    assert {key: options.to_dict()[key] for key in expected} == expected
    assert str(Variant("m", "src", None, options).relative_dir) == folder


@pytest.mark.parametrize(("recipe", "message"), [
    ({"models": [{"source": "x", "variants": ["cpu-int3"]}]}, "Unknown variant"),
    ({"models": [{"source": "x", "variants": ["cpu-fp16"]}]}, "fp16 on CPU"),
    ({"models": [{"source": "x", "variants": [{"variant": "cpu-fp32", "colour": 1}]}]}, "colour"),
    ({"models": [{"source": "x", "variants": ["cpu-fp32", {"variant": "cpu-fp32", "max_length": 9}]}]},
     "share the folder"),
    ({"models": []}, "non-empty `models`"),
    ({"models": [{"source": "x"}]}, "lists no variants"),
    ({"models": [{"source": "x", "variants": ["cpu-fp32"]}], "verification": {"thresholds": {"fp32": {"top2": 1}}}},
     "top2"),
    ({"models": [{"source": "x", "variants": ["cpu-fp32"], "colour": 1}]}, "colour"),
])
def test_bad_recipes(tmp_path, recipe, message):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(RecipeError, match=message):
        load_recipe(path)
    result = run("build", str(path))
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_shipped_recipes_parse():
    root = Path(__file__).resolve().parents[2]
    for path in (root / "recipes" / "phi.yaml", root / "examples" / "ci" / "recipe.yaml"):
        recipe = load_recipe(path)
        assert recipe.variants
