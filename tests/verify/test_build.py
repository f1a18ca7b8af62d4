"""`phi-onnx build RECIPE`: layout, summaries, skipping what is up to date, one failure not stopping the rest."""

from __future__ import annotations

import importlib
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
                          # no two runtimes give bit-identical logits: a limit of 0 is valid and fails
                          verification={**FAST_VERIFY, "thresholds": {"fp32": {"max_abs_logit_diff": 0}}})
    result = run("build", str(recipe))
    assert result.exit_code == 1
    row = summary(tmp_path / "out")[("gqa", "cpu-fp32")]
    assert row["status"] == "built" and row["verification"] == "failed" and "max_abs_logit_diff" in row["reason"]


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


@pytest.mark.parametrize("name", ["..", ".", "a/../../x", "/etc", "", "  ", "a\\..\\b", "x\0y", ["list"]])
def test_model_names_cannot_leave_the_output_folder(tmp_path, name):
    (tmp_path / "cpu_and_mobile").mkdir()  # what `name: ..` would have reached and replaced
    (tmp_path / "cpu_and_mobile" / "mine.txt").write_text("mine")
    path = tmp_path / "sub" / "r.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump({"output": str(tmp_path / "sub" / "out"),
                                    "models": [{"name": name, "source": "tiny-phi3", "variants": ["cpu-fp32"]}]}))
    with pytest.raises(RecipeError, match=r"Model name .* is not a folder name"):
        load_recipe(path)
    result = run("build", str(path))
    assert result.exit_code == 2 and "Traceback" not in result.output and "not a folder name" in result.output
    assert (tmp_path / "cpu_and_mobile" / "mine.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cpu_and_mobile", "sub"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["r.yaml"]


def test_default_name_from_a_hub_id_stays_one_component(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"models": [{"source": "microsoft/Phi-3-mini-4k-instruct",
                                                "variants": ["cpu-fp32"]}]}))
    assert str(load_recipe(path).variants[0].relative_dir) == "Phi-3-mini-4k-instruct/cpu_and_mobile/cpu-fp32"


def test_build_replaces_only_its_own_variants(tmp_path):
    """A variant folder holding something phi-onnx did not write is left alone and that variant fails."""
    out = tmp_path / "out"
    theirs = out / "tiny" / "cpu_and_mobile" / "cpu-fp32"
    theirs.mkdir(parents=True)
    (theirs / "mine.txt").write_text("mine")
    path = write_recipe(tmp_path / "r.yaml", [{"name": "tiny", "source": "tiny-phi3", "variants": ["cpu-fp32"]}],
                        verify=False)
    result = run("build", str(path))
    assert result.exit_code == 1, result.output
    row = summary(out)[("tiny", "cpu-fp32")]
    assert row["status"] == "failed" and "not a phi-onnx export" in row["reason"]
    assert sorted(p.name for p in theirs.iterdir()) == ["mine.txt"]


def test_build_replaces_its_earlier_variant(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", [{"name": "tiny", "source": "tiny-phi3", "variants": ["cpu-fp32"]}],
                        verify=False)
    assert run("build", str(path)).exit_code == 0
    folder = tmp_path / "out" / "tiny" / "cpu_and_mobile" / "cpu-fp32"
    created = json.loads((folder / "phi_onnx.json").read_text())["created"]
    result = run("build", str(path), "--force")
    assert result.exit_code == 0, result.output
    assert summary(tmp_path / "out")[("tiny", "cpu-fp32")]["status"] == "built"
    assert (folder / "model.onnx").is_file() and created


@pytest.mark.parametrize(("recipe", "message"), [
    ({"output": ["a"], "models": [{"source": "x", "variants": ["cpu-fp32"]}]}, "`output` must be a folder path"),
    ({"variants": "cpu-fp32", "models": [{"source": "x"}]}, "must be a list"),
    ({"models": [{"source": 5, "variants": ["cpu-fp32"]}]}, "must be a short name"),
    ({"models": [{"source": "x", "variants": ["cpu-fp32"], 3: 1}]}, "unknown key"),
    ({"models": [{"source": "x", "variants": ["cpu-fp32"]}], "verification": {"new_tokens": "8"}}, "whole number"),
    ({"models": [{"source": "x", "variants": ["cpu-fp32"]}], "verification": {"window": 0}}, "whole number"),
    ({"models": [{"source": "x", "variants": ["cpu-fp32"], "revision": [1]}]}, "revision"),
    ({"models": [{"source": "x", "variants": ["cpu-fp32"]}], "verification": {"prompts": "a\0b"}}, "file path"),
    ({"models": [{"source": "x", "variants": ["cpu-fp32"]}], "verification": {"text": 5}}, "file path"),
])
def test_wrong_types_in_recipes(tmp_path, recipe, message):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(RecipeError, match=message):
        load_recipe(path)


def test_output_that_is_a_file(tmp_path):
    (tmp_path / "out").write_text("mine")
    path = write_recipe(tmp_path / "r.yaml", [{"name": "tiny", "source": "tiny-phi3", "variants": ["cpu-fp32"]}])
    result = CliRunner().invoke(main, ["build", str(path)])
    assert result.exit_code == 2 and "Cannot create the output folder" in result.output
    assert (tmp_path / "out").read_text() == "mine"


@pytest.mark.parametrize("name", ["summary.md", "summary.json"])
def test_a_summary_that_is_a_link_is_not_written_through(tmp_path, name):
    path = write_recipe(tmp_path / "r.yaml", [{"name": "tiny", "source": "tiny-phi3", "variants": ["cpu-fp32"]}],
                        verify=False)
    assert run("build", str(path)).exit_code == 0
    out = tmp_path / "out"
    elsewhere = tmp_path / "mine"
    elsewhere.write_text((out / name).read_text())  # a file a build could have written, kept elsewhere
    (out / name).unlink()
    (out / name).symlink_to(elsewhere)
    before = elsewhere.read_text()
    result = CliRunner().invoke(main, ["build", str(path), "--force"])
    assert result.exit_code == 2 and "that `phi-onnx build` did not write" in result.output
    assert elsewhere.read_text() == before and (out / name).is_symlink()


@pytest.mark.parametrize("name", ["summary.md", "summary.json"])
def test_summaries_a_build_did_not_write_are_not_replaced(tmp_path, name):
    out = tmp_path / "out"
    out.mkdir()
    (out / name).write_text("my notes")
    path = write_recipe(tmp_path / "r.yaml", [{"name": "tiny", "source": "tiny-phi3", "variants": ["cpu-fp32"]}])
    result = CliRunner().invoke(main, ["build", str(path)])
    assert result.exit_code == 2 and "that `phi-onnx build` did not write" in result.output
    assert sorted(p.name for p in out.iterdir()) == [name] and (out / name).read_text() == "my notes"


@pytest.mark.parametrize("content", [b"\xff\xfe\x00b\x00i\x00n", b"models:\n- source: caf\xe9\n"])
def test_a_recipe_that_is_not_utf8_is_a_clean_error(tmp_path, content):
    path = tmp_path / "r.yaml"
    path.write_bytes(content)
    result = run("build", str(path))
    assert result.exit_code == 2
    assert f"The recipe {path} is not UTF-8 text (byte" in result.stderr and "a recipe is a YAML file" in result.stderr
    assert "Traceback" not in result.output and list(tmp_path.iterdir()) == [path]


@pytest.mark.parametrize(("verification", "message"), [
    ({"text_tokens": 100, "window": 256}, "text_tokens (100) is less than one perplexity window (256 tokens)"),
    ({"text_tokens": 100}, "text_tokens (100) is less than one perplexity window (256 tokens)"),  # default window
    ({"thresholds": {"int4": {"top1_agreement": float("nan")}}}, "top1_agreement limit must be a finite number "
                                                                 "from 0 to 1, not nan"),
    ({"thresholds": {"fp32": {"max_abs_logit_diff": float("inf")}}}, "finite number of at least 0, not inf"),
    ({"thresholds": {"fp16": {"kl_divergence": -1}}}, "kl_divergence limit must be a finite number of at least 0"),
    ({"thresholds": {"int4": {"greedy_agreement": 2}}}, "from 0 to 1, not 2"),
])
def test_verification_that_cannot_pass_or_measure_is_refused_before_any_export(tmp_path, monkeypatch, verification,
                                                                               message):
    def never(*args, **kwargs):
        raise AssertionError("a recipe that cannot verify must be refused before exporting")

    monkeypatch.setattr(importlib.import_module("phi_onnx.export"), "export", never)  # what build() imports
    path = write_recipe(tmp_path / "r.yaml", [{"name": "tiny", "source": "tiny-phi3", "variants": ["cpu-fp32"]}])
    data = yaml.safe_load(path.read_text())
    data["verification"] = verification
    path.write_text(yaml.safe_dump(data))
    result = run("build", str(path))
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()
    if "text_tokens" in verification:
        assert "--text-tokens" in result.stderr and "`verification.window`" in result.stderr  # the fix, both ways
