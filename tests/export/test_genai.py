"""onnxruntime-genai loads fp32 exports as they are, and its greedy tokens equal transformers'."""

from __future__ import annotations

import json

import pytest
from helpers import genai_greedy, random_ids, transformers_greedy

og = pytest.importorskip("onnxruntime_genai")

NEW_TOKENS = 32


@pytest.mark.parametrize("name", ["phi3-mha", "phi3-gqa", "phi4mini", "phi3-rot24", "phi3-window"])
def test_genai_greedy_equals_transformers(name, make_checkpoint, make_export, reference_model):
    prompt = random_ids(16, seed=7)  # 16 + 32 stays below phi4mini's original context (64)
    expected = transformers_greedy(reference_model(make_checkpoint(name)), prompt, NEW_TOKENS)
    assert genai_greedy(make_export(name), prompt, NEW_TOKENS) == expected


def test_genai_config_fields(make_checkpoint, make_export):
    cfg = json.loads((make_export("phi3-mha") / "genai_config.json").read_text())
    gen = json.loads((make_checkpoint("phi3-mha") / "generation_config.json").read_text())
    assert cfg["model"]["eos_token_id"] == gen["eos_token_id"]  # every EOS id, <|end|> included
    assert cfg["model"]["type"] == "phi3"
    assert cfg["search"]["max_length"] == 4096  # capped, not the context of a 128k model
    assert cfg["model"]["decoder"]["session_options"]["intra_op_num_threads"] == 0


def test_genai_max_length_capped_for_long_context(make_export):
    cfg = json.loads((make_export("phi4mini") / "genai_config.json").read_text())
    assert cfg["model"]["context_length"] == 512
    assert cfg["search"]["max_length"] == 512
