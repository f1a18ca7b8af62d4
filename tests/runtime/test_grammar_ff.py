"""Fast-forward of the tokens a grammar forces (SequenceState.fast_forward, DecodeCore.extend): the same
replies as token-by-token decoding, in fewer model runs, in the library and the Scheduler alike."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
from helpers import random_ids

from phi_onnx.runtime import grammar, sequence
from phi_onnx.runtime.scheduler import Scheduler, TokenEvent

jsonschema = pytest.importorskip("jsonschema")

# Fixed keys and an enum: most of a reply is forced.
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "colour": {"enum": ["crimson red", "ultramarine blue"]},
        "tags": {"type": "array", "items": {"enum": ["alpha", "beta"]}, "maxItems": 3},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "colour", "tags", "ok"],
    "additionalProperties": False,
}
PROMPT = "Describe a person:"


@contextmanager
def fast_forward(on: bool) -> Iterator[None]:
    saved = sequence.FAST_FORWARD
    sequence.FAST_FORWARD = on
    try:
        yield
    finally:
        sequence.FAST_FORWARD = saved


@contextmanager
def counted_runs(core: Any) -> Iterator[list[int]]:
    """Counts the session runs of `core` (each prefill chunk, decode run or forced-tail run is one)."""
    count = [0]
    run = core.run

    def counting(*args: Any, **kwargs: Any) -> Any:
        count[0] += 1
        return run(*args, **kwargs)

    core.run = counting
    try:
        yield count
    finally:
        del core.run  # the instance attribute hid the method


def generate(model: Any, on: bool, **options: Any) -> tuple[Any, int]:
    with fast_forward(on), counted_runs(model.core) as runs:
        result = model.generate(PROMPT, json_schema=PERSON, **options)
    return result, runs[0]


def forced_positions(model: Any, token_ids: list[int]) -> list[int]:
    """Indices of `token_ids` (a reply to PERSON) that fast-forward takes: replayed on a fresh matcher,
    the tokens llguidance forces after each sampled one."""
    matcher = model.grammar(grammar.json_schema(PERSON)).for_sequence().matcher
    forced, pending = [], 0
    for i, token in enumerate(token_ids):
        if token in model.eos_token_ids:
            break
        sampled = not pending
        if not sampled:
            forced.append(i)
            pending -= 1
        assert matcher.consume_token(token)
        if sampled:
            pending = min(len(matcher.compute_ff_tokens()), sequence.FAST_FORWARD_MAX)
    return forced


def test_greedy_reply_is_the_same_in_fewer_runs(tiny):
    on, runs_on = generate(tiny, True, max_new_tokens=120)
    off, runs_off = generate(tiny, False, max_new_tokens=120)
    assert on.token_ids == off.token_ids and on.text == off.text and on.finish_reason == off.finish_reason == "eos"
    jsonschema.validate(json.loads(on.text), PERSON)
    assert runs_off == len(off.token_ids)  # one prefill, then a decode run per token but the EOS
    forced = forced_positions(tiny, on.token_ids)
    assert len(forced) >= len(on.token_ids) // 3  # the test is about something
    assert runs_on == runs_off - len(forced)  # each forced token rode along with the run before it


def test_seeded_sampling_is_valid_reproducible_and_takes_fewer_runs(tiny):
    # Not compared with token-by-token decoding: in this int4 export (activations quantized per run) the
    # logits after a multi-token run differ from a one-token run's by ~0.03, enough to flip a rare draw.
    total_on = total_off = 0
    for seed in range(16):
        on, runs_on = generate(tiny, True, max_new_tokens=120, temperature=1.0, seed=seed)
        again, _ = generate(tiny, True, max_new_tokens=120, temperature=1.0, seed=seed)
        _, runs_off = generate(tiny, False, max_new_tokens=120, temperature=1.0, seed=seed)
        assert on.finish_reason == "eos", (seed, on.text)
        jsonschema.validate(json.loads(on.text), PERSON)
        assert again.token_ids == on.token_ids, seed
        total_on, total_off = total_on + runs_on, total_off + runs_off
    assert total_on < 0.75 * total_off


def test_max_new_tokens_and_stop_strings_cut_inside_a_forced_run(tiny):
    full, _ = generate(tiny, False, max_new_tokens=120)
    forced = forced_positions(tiny, full.token_ids)
    # a budget ending inside a run of forced tokens (the token before the last one kept is forced too)
    cut = next(i + 1 for i in forced if i - 1 in forced and i + 1 in forced)
    on, runs = generate(tiny, True, max_new_tokens=cut)
    assert on.token_ids == full.token_ids[:cut] and on.finish_reason == "length"
    assert on.text == tiny.decode(full.token_ids[:cut])
    assert runs < cut  # it did fast-forward up to the budget, never past it
    # "colour" is a fixed key, forced after the age's digits
    assert '"colour":' in full.text
    stopped, _ = generate(tiny, True, max_new_tokens=120, stop=["lour"])
    plain, _ = generate(tiny, False, max_new_tokens=120, stop=["lour"])
    assert stopped.finish_reason == plain.finish_reason == "stop"
    assert stopped.text == plain.text == full.text[: full.text.index("lour")]
    assert stopped.token_ids == plain.token_ids and len(stopped.token_ids) < len(full.token_ids)


def test_streamed_pieces_are_those_of_token_by_token_decoding(tiny):
    pieces = {}
    for on in (True, False):
        with fast_forward(on):
            stream = tiny.stream(PROMPT, json_schema=PERSON, max_new_tokens=120, stop=["}"])
            pieces[on] = list(stream)
            assert stream.result is not None and stream.result.finish_reason == "stop"
    assert pieces[True] == pieces[False] and len(pieces[True]) > 10


def test_no_fast_forward_with_logprobs_or_another_processor(tiny):
    with_logprobs, runs = generate(tiny, True, max_new_tokens=120, logprobs=True)
    assert runs == len(with_logprobs.token_ids)  # every token has its own run, and its own logits
    assert len(with_logprobs.logprobs) == len(with_logprobs.token_ids)
    assert all(e.logprob is not None and e.logprob <= 0 for e in with_logprobs.logprobs)

    def identity(token_ids: list[int], scores: np.ndarray) -> np.ndarray:
        return scores

    other, runs = generate(tiny, True, max_new_tokens=120, logits_processors=[identity])
    assert runs == len(other.token_ids)
    assert other.token_ids == with_logprobs.token_ids


def run_scheduler(scheduler: Scheduler, handles: list[Any]) -> None:
    for _ in range(2000):
        if all(h.finish for h in handles):
            return
        scheduler.step()
    raise AssertionError("the scheduler did not finish")


@pytest.mark.parametrize("chunk", [256, 1])
def test_the_scheduler_equals_the_library(tiny, chunk):
    """Greedy and seeded requests side by side (and with a prefill budget of 1 token per step, a forced
    tail still runs whole: at least one per step) get the library's tokens, events and text."""
    settings = [{}, {"temperature": 1.0, "seed": 3}, {"temperature": 1.0, "seed": 8}, {"stop": ['"ok"']}]
    # one-token prompts with chunk=1: a prompt prefilled in other chunks than the library's would have
    # other rounding, which may change a seeded draw (the prefix cache's caveat, not fast-forward's)
    prompts = [PROMPT, "Another person, please:", "x", PROMPT] if chunk > 1 else ["x", "A", "x", "A"]
    expected = [tiny.generate(p, json_schema=PERSON, max_new_tokens=120, **s)
                for p, s in zip(prompts, settings, strict=True)]
    scheduler = Scheduler(tiny, max_batch=3, max_queue=8, chunk=chunk)
    try:
        events: list[list[Any]] = [[] for _ in prompts]
        tails: list[int] = []  # the step of each forced-tail run
        extend = tiny.core.extend

        def recording(*args: Any) -> Any:
            tails.append(scheduler.steps)
            return extend(*args)

        tiny.core.extend = recording
        try:
            with counted_runs(tiny.core) as runs:
                handles = [scheduler.submit(tiny.encode(p), tiny.options(json_schema=PERSON, max_new_tokens=120, **s),
                                            sink=events[i].append)
                           for i, (p, s) in enumerate(zip(prompts, settings, strict=True))]
                run_scheduler(scheduler, handles)
        finally:
            del tiny.core.extend
        per_step = max(tails.count(step) for step in tails)
        # a budget of 1 token: one tail per step (the others wait); 256: every pending tail in the step
        assert per_step == 1 if chunk == 1 else per_step > 1
        for handle, want, got in zip(handles, expected, events, strict=True):
            assert handle.generated == want.token_ids
            assert handle.finish.text == want.text and handle.finish.reason == want.finish_reason
            tokens = [e for e in got if isinstance(e, TokenEvent)]
            assert [e.token_id for e in tokens] == want.token_ids  # one event per token, forced ones too
            assert "".join(e.text for e in tokens) == want.text
        assert runs[0] < sum(len(w.token_ids) for w in expected) * 0.75  # token by token: about one run each
        assert scheduler.active == 0
    finally:
        scheduler.close()


def test_a_forced_tail_crossing_the_longrope_switch_is_recomputed(models):
    model = models("phi4mini")
    core, threshold = model.core, model.folder.long_context_threshold
    assert threshold == 64
    ids = random_ids(70, seed=4).ravel().tolist()
    pool = core.pool(2, 128)
    try:
        assert core.prefill(pool, 0, ids[:60]) is not None and not pool.long[0]
        before = core.recomputes
        crossed = core.extend(pool, 0, ids[60:])  # 60 short-factor entries + 10 reach past 64
        assert core.recomputes == before + 1 and pool.long[0] and pool.held[0] == ids
        fresh = core.prefill(pool, 1, ids)
        np.testing.assert_allclose(crossed, fresh, rtol=1e-4, atol=1e-4)
        short = core.extend(pool, 1, [5, 6])  # already long: a plain run over the held prefix
        assert core.recomputes == before + 1 and pool.held[1] == [*ids, 5, 6]
        assert short.shape == (model.folder.vocab_size,)
    finally:
        pool.close()


def test_the_genai_backend_appends_forced_tokens_together(tiny):
    pytest.importorskip("onnxruntime_genai")
    import phi_onnx

    with phi_onnx.load(tiny.path, device="cpu", backend="genai") as model:
        engine, calls = model.engine, [0]
        extend = engine._extend

        def counting(tokens: Any, past: int) -> Any:
            calls[0] += 1
            return extend(tokens, past)

        engine._extend = counting
        results, runs = {}, {}
        for on in (True, False):
            calls[0] = 0
            with fast_forward(on):
                results[on] = model.generate(PROMPT, json_schema=PERSON, max_new_tokens=120)
            runs[on] = calls[0]
    assert results[True].token_ids == results[False].token_ids
    jsonschema.validate(json.loads(results[True].text), PERSON)
    assert runs[False] == len(results[False].token_ids) and runs[True] < 0.75 * runs[False]


def test_tool_calls_fast_forward_after_the_model_opens_a_call(phi4_mini_tools_export):
    import phi_onnx

    add = {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        "required": ["a", "b"], "additionalProperties": False}}}
    ask = [{"role": "user", "content": "Add 2 and 3."}]
    with phi_onnx.load(phi4_mini_tools_export, device="cpu", backend="ort") as model:
        opened = model.tokenizer.token_to_id("<|tool_call|>")
        for choice, extra in (("auto", {"logit_bias": {opened: 100}}), ("required", {})):
            results, runs = {}, {}
            for on in (True, False):
                with fast_forward(on), counted_runs(model.core) as count:
                    results[on] = model.chat(ask, tools=[add], tool_choice=choice, temperature=1.0, seed=1,
                                             max_new_tokens=200, **extra)
                runs[on] = count[0]
            # an fp32 export: a multi-token run's logits equal a one-token run's to ~1e-6, and a forced token
            # still uses its draw, so the seeded replies agree token for token
            assert results[True].token_ids == results[False].token_ids, choice
            assert results[True].finish_reason == "tool_calls" and results[True].tool_calls[0].name == "add"
            assert runs[True] < runs[False] - 3, (choice, runs)  # at least `[{"name":"add","arguments":{"a":`
