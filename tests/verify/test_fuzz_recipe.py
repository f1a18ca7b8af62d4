"""Property-based fuzzing of the recipe reader: any recipe gives a Recipe or a PhiOnnxError, never another
exception, and every folder a recipe names stays inside its output."""

from __future__ import annotations

from pathlib import Path

import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from phi_onnx.errors import PhiOnnxError
from phi_onnx.verify.build import Recipe, load_recipe, parse_recipe

FUZZ = settings(max_examples=200, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

scalars = (st.none() | st.booleans() | st.integers(-10, 10**6) | st.floats(allow_nan=True)
           | st.text(max_size=10) | st.sampled_from(["..", ".", "/", "a/../../x", "/etc", "", "~", "x\\y", "a\0b"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=6) | st.integers(), inner, max_size=3), max_leaves=8)
good_variants = st.sampled_from(["cpu-fp32", "cpu-int4-rtn-block-32", "cuda-fp16", "cuda-int4-rtn-block-32",
                                 "cpu-int4-rtn-asym-block-128-acc-level-0", "cpu-int4-rtn-block-64"])
names = st.sampled_from(["phi-3-mini", "Phi-4-mini-instruct-onnx", "m1", "tiny"]) | scalars


@st.composite
def recipes(draw: st.DrawFn) -> object:
    """A valid recipe, then a few of its values (anywhere in the tree) replaced by anything."""
    model_list = []
    for _ in range(draw(st.integers(1, 3))):
        model: dict[object, object] = {"name": draw(st.sampled_from(["a", "b", "c"])), "source": draw(
            st.sampled_from(["tiny-phi3", "microsoft/Phi-3-mini-4k-instruct", "ckpt"]))}
        if draw(st.booleans()):
            model["variants"] = draw(st.lists(good_variants | st.fixed_dictionaries(
                {"variant": good_variants}, optional={"max_length": st.integers(1, 9000)}), max_size=2, unique_by=str))
        model_list.append(model)
    recipe: dict[object, object] = {"models": model_list, "variants": draw(st.lists(good_variants, min_size=1,
                                                                                  max_size=2, unique=True))}
    if draw(st.booleans()):
        recipe["verification"] = {"new_tokens": 8, "thresholds": {"int4": {"top1_agreement": 0.85}}}
    for _ in range(draw(st.integers(0, 3))):
        node: object = recipe
        while isinstance(node, (dict, list)) and node and draw(st.booleans()):
            key = draw(st.sampled_from(sorted(node, key=str) if isinstance(node, dict) else range(len(node))))
            parent, node = node, node[key]  # type: ignore[index]
            if not isinstance(node, (dict, list)) or not node or draw(st.booleans()):
                parent[key] = draw(values | names)  # type: ignore[index]
                break
        else:
            if isinstance(node, dict):
                node[draw(st.sampled_from(["name", "output", "revision", "verify", "colour", 3]))] = draw(
                    values | names)
    return recipe


def _check(recipe: Recipe) -> None:
    out = recipe.output.resolve()
    for variant in recipe.variants:
        assert (recipe.output / variant.relative_dir).resolve().is_relative_to(out)
        assert len(variant.relative_dir.parts) == 3


@FUZZ
@given(recipes())
# Found by this test: an output path with a NUL byte (a ValueError from the OS path functions).
@example(data={"models": [{"name": "a", "source": "tiny-phi3"}], "variants": ["cpu-fp32"], "output": "\x00"})
def test_recipe_structures(tmp_path_factory, data):
    base = tmp_path_factory.getbasetemp() / "fuzz-recipe"
    (base / "ckpt").mkdir(parents=True, exist_ok=True)
    try:
        recipe = parse_recipe(data, base / "recipe.yaml")
    except PhiOnnxError:
        return
    _check(recipe)


@FUZZ
@given(st.text(max_size=300) | recipes().map(lambda d: yaml.safe_dump(d, allow_unicode=True)))
# Found by this test: variant option keys that YAML does not read as strings (an int, None).
@example(text="models:\n- source: A\nvariants:\n- ? 08\n  0:")
@example(text="models:\n- source: A\nvariants:\n- ?\n  :")
def test_recipe_files(tmp_path_factory, text):
    path = Path(tmp_path_factory.mktemp("r")) / "recipe.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        recipe = load_recipe(path)
    except PhiOnnxError:
        return
    _check(recipe)
