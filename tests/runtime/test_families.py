"""The runtime on Phi-2, Phi-3.5-MoE and Phi-3-small exports: greedy parity, seeded sampling, chat.

The checkpoints are the trained tiny ones of tests/export/test_int4_quality_families.py (Phi-3 chat
template, `<|end|>` and `<|endoftext|>` as EOS). The references are transformers' `generate` for
Phi-2 and Phi-3.5-MoE, and a greedy loop over the PyTorch reference for Phi-3-small.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import loaded_models
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from phi_onnx.export import ExportOptions, export

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "export"))
from phi3small_reference import forward
from test_int4_quality_families import trained_checkpoint, trained_root

# Every test needs the trained checkpoints (one to two minutes of training each, once per run): one worker takes
# them all with the export tests that train them (--dist loadgroup), so no worker idles on another's lock.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("trained-families")]

FAMILIES = ["phi2", "phimoe", "phi3small"]
BACKENDS = ["ort", "genai"]
NEW_TOKENS = 24
SAMPLED = {"temperature": 1.2, "top_k": 50, "top_p": 0.95, "max_new_tokens": 16, "min_new_tokens": 16}
MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "What does os.path.join do?"}]


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory):
    """Same folders as the export tests' `trained` fixture (the training cache is module level)."""
    root = trained_root(tmp_path_factory)
    return lambda name: trained_checkpoint(name, root)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, trained):
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            cache[name] = tmp_path_factory.mktemp("family-export") / name
            export(trained(name), cache[name], ExportOptions(precision="fp32"))
        return cache[name]

    return get


@pytest.fixture(scope="module")
def loaded(exported):
    with loaded_models(exported) as get:
        yield get


def prompt_ids(folder: Path) -> list[int]:
    """The start of the held-out text (the model never trained on it)."""
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    return tokenizer((folder / "heldout.txt").read_text()[:120], add_special_tokens=False)["input_ids"][:20]


def reference_greedy(name: str, folder: Path, prompt: list[int], new_tokens: int, eos: tuple[int, ...]) -> list[int]:
    """The reference's greedy continuation with EOS suppressed (as `min_new_tokens` does)."""
    if name == "phi3small":
        from safetensors.torch import load_file

        cfg = json.loads((folder / "config.json").read_text())
        weights = load_file(str(folder / "model.safetensors"))
        ids = list(prompt)
        for _ in range(new_tokens):
            logits = forward(cfg, weights, np.array([ids], dtype=np.int64))[0, -1]
            logits[list(eos)] = -np.inf
            ids.append(int(logits.argmax()))
        return ids[len(prompt):]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", FAMILIES)
def test_greedy_equals_reference(name, backend, loaded, trained):
    model = loaded(name, backend)
    prompt = prompt_ids(trained(name))
    expected = reference_greedy(name, trained(name), prompt, NEW_TOKENS, model.eos_token_ids)
    result = model.generate(prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    assert result.token_ids == expected
    assert result.backend == backend and result.provider == "CPUExecutionProvider"
    if backend == "ort":  # the LM head runs on the last prompt position only (bias, muP and masks included)
        assert model.engine.keeps_logits


@pytest.mark.parametrize("name", FAMILIES)
def test_seeded_sampling_reproducible_and_equal_across_backends(name, loaded, trained):
    prompt = prompt_ids(trained(name))
    ort_model, genai_model = loaded(name, "ort"), loaded(name, "genai")
    first = ort_model.generate(prompt, seed=5, **SAMPLED).token_ids
    assert ort_model.generate(prompt, seed=5, **SAMPLED).token_ids == first
    assert genai_model.generate(prompt, seed=5, **SAMPLED).token_ids == first
    assert genai_model.generate(prompt, seed=5, **SAMPLED).token_ids == first
    greedy = ort_model.generate(prompt, **{**SAMPLED, "temperature": 0.0}).token_ids
    assert first != greedy or ort_model.generate(prompt, seed=6, **SAMPLED).token_ids != first  # it did sample


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", FAMILIES)
def test_chat_uses_the_phi3_template(name, backend, loaded, exported, trained):
    model = loaded(name, backend)
    reference = PreTrainedTokenizerFast.from_pretrained(exported(name))
    assert reference.chat_template and "<|assistant|>" in reference.chat_template
    expected = list(reference.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True,
                                                  return_dict=False))
    assert model.chat_prompt_ids(MESSAGES) == expected
    assert model.tokenizer.token_to_id("<|end|>") in model.eos_token_ids
    reply = model.chat(MESSAGES, max_new_tokens=12, min_new_tokens=12)
    assert reply.prompt_tokens == len(expected)
    assert reply.token_ids == reference_greedy(name, trained(name), expected, 12, model.eos_token_ids)
    assert reply.text == model.decode(reply.token_ids)
