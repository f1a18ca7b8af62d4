"""Constrained decoding (runtime/grammar.py) on the bundled tiny-phi3: json_schema, regex, Lark, limits."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from phi_onnx.errors import OptionsError
from phi_onnx.runtime import grammar
from phi_onnx.runtime.scheduler import Scheduler

jsonschema = pytest.importorskip("jsonschema")

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "ok"],
    "additionalProperties": False,
}


def test_json_schema_at_temperature_one_is_valid_for_every_seed(tiny):
    for seed in range(24):
        result = tiny.generate("Describe a person:", json_schema=PERSON, temperature=1.0, seed=seed,
                               max_new_tokens=80)
        assert result.finish_reason == "eos", (seed, result.text)
        jsonschema.validate(json.loads(result.text), PERSON)
        assert result.token_ids[-1] in tiny.eos_token_ids


def test_chat_json_schema_and_json_object_are_valid(tiny):
    messages = [{"role": "user", "content": "Give me JSON."}]
    for seed in range(6):
        result = tiny.chat(messages, json_schema=json.dumps(PERSON), temperature=1.0, seed=seed, max_new_tokens=80)
        jsonschema.validate(json.loads(result.text), PERSON)
    for seed in range(3):
        anything = tiny.chat(messages, json_object=True, temperature=0.7, seed=seed, max_new_tokens=100)
        if anything.finish_reason == "eos":
            assert isinstance(json.loads(anything.text), dict)
        else:  # a random model may nest without end: cut, but never off the grammar
            assert anything.finish_reason == "length" and anything.text.startswith("{")


def test_a_static_batch_gets_one_matcher_per_row(tiny):
    prompts = ["A", "Two words", "A much longer prompt than the others"]
    results = tiny.generate(prompts, json_schema=PERSON, temperature=1.0, seed=3, max_new_tokens=80)
    for result in results:
        assert result.finish_reason == "eos"
        jsonschema.validate(json.loads(result.text), PERSON)


def test_regex_and_lark(tiny):
    pattern = r"[0-9]{3}-[a-z]{2,4}"
    for seed in range(8):
        text = tiny.generate("Code:", regex=pattern, temperature=1.0, seed=seed).text
        assert re.fullmatch(pattern, text), text
    lark = 'start: answer " because " REASON\nanswer: "yes" | "no"\nREASON: /[a-z]{1,8}/'
    seen = set()
    for seed in range(8):
        result = tiny.chat([{"role": "user", "content": "Well?"}], grammar=lark, temperature=1.0, seed=seed)
        assert result.finish_reason == "eos"
        assert re.fullmatch(r"(yes|no) because [a-z]{1,8}", result.text), result.text
        seen.add(result.text.split()[0])
    assert seen == {"yes", "no"}  # sampled, not forced to one branch


def test_a_reply_cut_by_max_new_tokens_says_length(tiny):
    result = tiny.generate("x", json_schema=PERSON, temperature=1.0, seed=0, max_new_tokens=4)
    assert result.finish_reason == "length" and len(result.token_ids) == 4
    assert result.text.startswith('{"name":')  # the schema's first property is forced


def test_greedy_text_without_a_grammar_is_unchanged(tiny):
    before = tiny.generate("The quick brown fox", max_new_tokens=24, min_new_tokens=24)
    tiny.generate("The quick brown fox", json_schema=PERSON, max_new_tokens=24)
    after = tiny.generate("The quick brown fox", max_new_tokens=24, min_new_tokens=24)
    assert after.token_ids == before.token_ids and after.text == before.text
    assert len(before.token_ids) == 24  # the comparison covers a whole reply, not an early EOS


def test_unenforceable_schemas_are_refused_naming_the_keyword(tiny):
    with pytest.raises(OptionsError) as error:
        tiny.generate("x", json_schema={"type": "array", "uniqueItems": True})
    assert "uniqueItems" in error.value.message and "strict=False" in error.value.hint
    with pytest.raises(OptionsError, match="Unknown format: colour"):
        tiny.generate("x", json_schema={"type": "string", "format": "colour"})
    with pytest.raises(OptionsError, match="not valid JSON"):
        tiny.generate("x", json_schema="{not json")
    with pytest.raises(OptionsError, match="Only one of"):
        tiny.generate("x", json_schema=PERSON, regex="a")
    with pytest.raises(OptionsError, match="regex"):
        tiny.generate("x", regex="(unclosed")
    lenient = grammar.json_schema({"type": "array", "items": {"type": "integer"}, "uniqueItems": True,
                                   "maxItems": 2}, strict=False)
    assert any("uniqueItems" in w for w in lenient.warnings)
    result = tiny.generate("x", grammar=lenient, temperature=1.0, seed=1, max_new_tokens=60)
    value = json.loads(result.text)
    assert isinstance(value, list) and len(value) <= 2 and all(isinstance(v, int) for v in value)


def test_batched_masks_equal_one_by_one(tiny):
    processor = tiny.grammar(grammar.json_schema(PERSON))
    prompts = [[5, 6], [7], [8, 9, 10]]
    texts = ['{"na', '{"name":"bo","age":1', '{']
    rows = []
    for prompt, text in zip(prompts, texts, strict=True):
        seq = processor.for_sequence()
        seq.advance(prompt)
        rows.append(((seq,), prompt + tiny.encode(text, add_special_tokens=False)))
    assert grammar.fill_masks(rows) == 3
    batched = [processors[0].allowed().copy() for processors, _ in rows]
    for (processors, _tokens), mask in zip(rows, batched, strict=True):
        processors[0]._mask = None
        assert np.array_equal(processors[0].allowed(), mask)
        assert mask.any()


def test_the_scheduler_constrains_each_request_on_its_own(tiny):
    scheduler = Scheduler(tiny, max_batch=3, max_queue=8)
    options = tiny.options(json_schema=PERSON, temperature=1.0, max_new_tokens=80)
    handles = [scheduler.submit(tiny.encode(p), options.__class__.from_kwargs(options, seed=i))
               for i, p in enumerate(["one", "two two", "three three three", "four"])]
    for _ in range(1000):
        if all(h.finish for h in handles):
            break
        scheduler.step()
    for handle in handles:
        assert handle.finish.reason == "eos", handle.finish
        jsonschema.validate(json.loads(handle.finish.text), PERSON)
    scheduler.close()


def test_the_tokenizer_for_llguidance_is_cached_and_sized_to_the_model(tiny):
    folder: Path = tiny.path
    first = grammar.grammar_tokenizer(folder, tiny.folder.vocab_size, tiny.eos_token_ids)
    assert grammar.grammar_tokenizer(folder, tiny.folder.vocab_size, tiny.eos_token_ids) is first
    assert first.vocab_size == tiny.folder.vocab_size
    assert sorted(first.eos_tokens) == sorted(tiny.eos_token_ids)


def test_cli_json_schema_file(tiny, tmp_path):
    from click.testing import CliRunner

    from phi_onnx.cli import main

    schema = tmp_path / "person.json"
    schema.write_text(json.dumps(PERSON))
    for command in (["generate", str(tiny.path), "Person:", "--json"], ["chat", str(tiny.path), "--once", "--json"]):
        run = CliRunner().invoke(main, [*command, "--json-schema", str(schema), "--temperature", "1", "--seed", "5",
                                        "--max-new-tokens", "80"], input="Who?\n", catch_exceptions=False)
        assert run.exit_code == 0, run.output
        reply = json.loads(run.output.strip().splitlines()[-1])
        assert reply["finish_reason"] == "eos"
        jsonschema.validate(json.loads(reply["text"]), PERSON)
    bad = tmp_path / "bad.json"
    bad.write_text('{"type": "array", "uniqueItems": true}')
    not_json = tmp_path / "not.json"
    not_json.write_text("{type: object")
    for path, message in ((bad, "uniqueItems"), (not_json, "is not valid JSON"), (tmp_path / "missing.json",
                                                                                   "Cannot read the JSON schema")):
        run = CliRunner().invoke(main, ["generate", str(tiny.path), "x", "--json-schema", str(path)])
        assert run.exit_code == 2, run.output
        assert message in run.output and "Traceback" not in run.output


@pytest.mark.parametrize("vocab", [64, 1000, 200_003])
@pytest.mark.parametrize("density", [0.0, 0.001, 0.3, 0.7, 0.999, 1.0])
def test_apply_mask_equals_the_bit_by_bit_rule(vocab, density):
    # Sparse and dense masks take different paths; both must block exactly the tokens whose bit is 0,
    # including in the last, partly used word (bits past the vocabulary may be set by llguidance).
    rng = np.random.default_rng(int(vocab * 10 + density * 1000))
    words = (vocab + 31) // 32
    bits = rng.random(words * 32) < density
    bits[vocab:] = rng.random(words * 32 - vocab) < 0.5
    mask = np.packbits(bits, bitorder="little").view(np.int32)
    scores = rng.standard_normal(vocab).astype(np.float32)
    expected = np.where(bits[:vocab], scores, -np.inf)
    out = grammar.apply_mask(mask, scores)
    assert out is scores
    np.testing.assert_array_equal(out, expected)


def test_special_tokens_in_a_lark_grammar_do_not_warn_and_unknown_ones_are_refused(tiny, caplog):
    # Validation without a tokenizer cannot check `<|...|>` tokens; binding to the model does.
    with caplog.at_level("WARNING", logger="phi_onnx"):
        constraint = grammar.lark('start: <|end|> "x"')
    assert constraint.warnings == ()
    assert not [r for r in caplog.records if "not enforced" in r.getMessage()]
    tiny.grammar(constraint)
    with pytest.raises(OptionsError, match="cannot be enforced"):
        tiny.grammar(grammar.lark('start: <|no_such_token|> "x"'))
