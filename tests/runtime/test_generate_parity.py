"""Both backends' greedy tokens equal transformers' `generate` on the source checkpoint.

Includes the LongRoPE fixture decoding across its original context (64): transformers recomputes
the cache with the long factors at the crossing, and so must we (a plain cached loop diverges).
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import OnnxLM, loaded_models, random_ids, transformers_greedy

import phi_onnx
from phi_onnx.runtime.sampling import GenerationOptions, Sampler

BACKENDS = ["ort", "genai"]


@pytest.fixture(scope="module")
def loaded(make_export):
    """`loaded(name, backend)` → a cached phi_onnx Model."""
    with loaded_models(make_export) as get:
        yield get


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["phi3-mha", "phi3-gqa", "phi3-rot24", "phi3-window"])
def test_greedy_equals_transformers(name, backend, loaded, make_checkpoint, reference_model):
    prompt = random_ids(16, seed=11)  # longer than phi3-window's 8-token window
    expected = transformers_greedy(reference_model(make_checkpoint(name)), prompt, 24)
    result = loaded(name, backend).generate(prompt[0].tolist(), max_new_tokens=24, min_new_tokens=24)
    assert result.token_ids == expected
    assert result.backend == backend and result.provider == "CPUExecutionProvider"


def naive_cached_greedy(folder, prompt: np.ndarray, new_tokens: int, penalty: float) -> list[int]:
    """A loop that never recomputes its cache (what onnxruntime-genai's own loop does)."""
    lm = OnnxLM(folder)
    sampler = Sampler(GenerationOptions(repetition_penalty=penalty, min_new_tokens=new_tokens,
                                        max_new_tokens=new_tokens), [], prompt[0].tolist(), 1040)
    logits, out = lm(prompt)[:, -1], []
    for step in range(new_tokens):
        token = sampler(logits[0], [], step).token
        out.append(token)
        logits = lm(np.array([[token]], dtype=np.int64))[:, -1]
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_longrope_crossing_during_decode_equals_transformers(backend, loaded, make_checkpoint, make_export,
                                                             reference_model):
    # The random tied-embedding model repeats its input token under plain greedy decoding; a strong
    # repetition penalty (same semantics as transformers') makes each step's choice depend on the
    # rotary factors, so a stale short-factor cache shows up as different tokens.
    prompt, penalty = random_ids(50, seed=3), 10.0
    expected = transformers_greedy(reference_model(make_checkpoint("phi4mini")), prompt, 32, repetition_penalty=penalty)
    assert naive_cached_greedy(make_export("phi4mini"), prompt, 32, penalty) != expected  # the test can fail
    model = loaded("phi4mini", backend)
    assert model.folder.long_context_threshold == 64
    result = model.generate(prompt[0].tolist(), max_new_tokens=32, min_new_tokens=32, repetition_penalty=penalty)
    assert result.token_ids == expected
    assert result.recomputes == 1  # exactly once, when the sequence reached 65 tokens


@pytest.mark.parametrize("backend", BACKENDS)
def test_longrope_prompt_past_original_context(backend, loaded, make_checkpoint, reference_model):
    prompt = random_ids(70, seed=5)
    expected = transformers_greedy(reference_model(make_checkpoint("phi4mini")), prompt, 8, repetition_penalty=10.0)
    result = loaded("phi4mini", backend).generate(prompt[0].tolist(), max_new_tokens=8, min_new_tokens=8,
                                                  repetition_penalty=10.0)
    assert result.token_ids == expected
    assert result.recomputes == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_cache_reuse_gives_the_same_tokens(backend, loaded, make_export):
    """A follow-up prompt that extends the previous sequence reuses its cache, with the same tokens."""
    model = loaded("phi3-gqa", backend)
    first = model.generate(random_ids(12, seed=2)[0].tolist(), max_new_tokens=6, min_new_tokens=6)
    follow_up = random_ids(12, seed=2)[0].tolist() + first.token_ids + [40, 41, 42]
    reused = model.generate(follow_up, max_new_tokens=10, min_new_tokens=10)
    assert reused.cached_tokens == 12 + 6 - 1  # the last sampled token was never fed
    fresh = phi_onnx.load(make_export("phi3-gqa"), device="cpu", backend=backend)
    assert fresh.generate(follow_up, max_new_tokens=10, min_new_tokens=10).token_ids == reused.token_ids


def test_batched_prompts_with_padding_equal_single_runs(loaded, make_checkpoint, reference_model):
    model = loaded("phi3-gqa", "ort")
    prompts = [random_ids(n, seed=n)[0].tolist() for n in (5, 19, 11)]
    batched = model.generate(prompts, max_new_tokens=12, min_new_tokens=12)
    reference = reference_model(make_checkpoint("phi3-gqa"))
    for prompt, result in zip(prompts, batched, strict=True):
        assert result.token_ids == transformers_greedy(reference, np.array([prompt]), 12)
        assert result.prompt_tokens == len(prompt)
    assert model.engine.pool.slots == 3  # ran as one padded batch


def test_batched_rows_stop_independently(loaded):
    model = loaded("phi3-gqa", "ort")
    prompts = [random_ids(n, seed=n)[0].tolist() for n in (7, 9)]
    singles = [model.generate(p, max_new_tokens=10, min_new_tokens=10) for p in prompts]
    middle = len(singles[0].text) // 2
    stop = singles[0].text[middle: middle + 2]
    batched = model.generate(prompts, max_new_tokens=10, min_new_tokens=10, stop=[stop])
    for single, result in zip(singles, batched, strict=True):
        if stop in single.text:
            assert result.finish_reason == "stop"
            assert result.text == single.text[: single.text.index(stop)]
        else:
            assert result.finish_reason == "length" and result.token_ids == single.token_ids
    assert batched[0].finish_reason == "stop"


def test_batched_longrope_crossing_runs_rows_alone(loaded, make_checkpoint, reference_model):
    model = loaded("phi4mini", "ort")
    prompts = [random_ids(50, seed=3)[0].tolist(), random_ids(20, seed=4)[0].tolist()]
    results = model.generate(prompts, max_new_tokens=20, min_new_tokens=20, repetition_penalty=10.0)
    reference = reference_model(make_checkpoint("phi4mini"))
    for prompt, result in zip(prompts, results, strict=True):
        assert result.token_ids == transformers_greedy(reference, np.array([prompt]), 20, repetition_penalty=10.0)


def test_genai_backend_runs_batches_one_by_one(loaded):
    ort_model, genai_model = loaded("phi3-mha", "ort"), loaded("phi3-mha", "genai")
    prompts = [random_ids(n, seed=n)[0].tolist() for n in (6, 10)]
    expected = [r.token_ids for r in ort_model.generate(prompts, max_new_tokens=8, min_new_tokens=8)]
    assert [r.token_ids for r in genai_model.generate(prompts, max_new_tokens=8, min_new_tokens=8)] == expected


@pytest.mark.parametrize("prompt_len, new_tokens", [(70, 8), (50, 24)])
def test_chunked_prefill_keeps_longrope_factors_consistent(prompt_len, new_tokens, make_export, make_checkpoint,
                                                           reference_model):
    """Prompts run in chunks; from an empty cache the first chunk already crosses the switch."""
    model = phi_onnx.load(make_export("phi4mini"), device="cpu", backend="ort")
    model.core.chunk = 16
    assert model.core.rope.chunks(0, 70, 16) == [(0, 65), (65, 70)]
    assert model.core.rope.chunks(0, 40, 16) == [(0, 16), (16, 32), (32, 40)]
    prompt = random_ids(prompt_len, seed=prompt_len)
    expected = transformers_greedy(reference_model(make_checkpoint("phi4mini")), prompt, new_tokens,
                                   repetition_penalty=10.0)
    result = model.generate(prompt[0].tolist(), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                            repetition_penalty=10.0)
    assert result.token_ids == expected


def test_int4_backends_agree(make_export):
    folder = make_export("phi3-gqa", precision="int4")
    prompt = random_ids(20, seed=8)[0].tolist()
    ort_tokens = phi_onnx.load(folder, device="cpu", backend="ort").generate(prompt, max_new_tokens=16,
                                                                             min_new_tokens=16).token_ids
    genai_tokens = phi_onnx.load(folder, device="cpu", backend="genai").generate(prompt, max_new_tokens=16,
                                                                                 min_new_tokens=16).token_ids
    assert ort_tokens == genai_tokens
