"""The offline tokenizer builder, the bundled tiny-phi3 checkpoint and its training script."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from phi_onnx.tiny import TINY_PHI3_DIR, build_tokenizer

REPO = Path(__file__).resolve().parents[2]

PHI3_TOKENS = ["<unk>", "<s>", "</s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
PHI4_TOKENS = ["<unk>", "<s>", "</s>", "<|endoftext|>", "<|im_start|>", "<|im_sep|>", "<|im_end|>"]

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What does json.dumps do?"},
    {"role": "assistant", "content": "It serializes obj to a JSON str."},
    {"role": "user", "content": "And json.loads?"},
]
EXPECTED_CHAT = {
    "phi3": "<|system|>\nYou are terse.<|end|>\n<|user|>\nWhat does json.dumps do?<|end|>\n"
    "<|assistant|>\nIt serializes obj to a JSON str.<|end|>\n<|user|>\nAnd json.loads?<|end|>\n<|assistant|>\n",
    "phi4": "<|im_start|>system<|im_sep|>You are terse.<|im_end|><|im_start|>user<|im_sep|>What does json.dumps do?"
    "<|im_end|><|im_start|>assistant<|im_sep|>It serializes obj to a JSON str.<|im_end|>"
    "<|im_start|>user<|im_sep|>And json.loads?<|im_end|><|im_start|>assistant<|im_sep|>",
}

# Measured on the shipped checkpoint: heldout.txt perplexity 11.85 (loss 2.4723 nats/token), bf16 weights
# evaluated in fp32 over 256-token windows. The margin covers BLAS differences, not a broken model.
HELDOUT_PPL_MAX = 14.0


# --------------------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module", params=["phi3", "phi4"])
def tokenizer(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"tok-{request.param}")
    return request.param, folder, build_tokenizer(folder, vocab_size=1000, template=request.param)


def test_build_is_deterministic(tmp_path):
    a = build_tokenizer(tmp_path / "a", vocab_size=800)
    b = build_tokenizer(tmp_path / "b", vocab_size=800)
    assert a.get_vocab() == b.get_vocab()
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    assert len(a) == 800


def test_special_tokens_have_fixed_low_ids(tokenizer):
    template, _, tok = tokenizer
    names = PHI3_TOKENS if template == "phi3" else PHI4_TOKENS
    assert tok.convert_tokens_to_ids(names) == list(range(len(names)))
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 3, 3)
    assert len(tok) == 1000


def test_role_tokens_encode_as_single_ids(tokenizer):
    template, _, tok = tokenizer
    for name in PHI3_TOKENS if template == "phi3" else PHI4_TOKENS:
        token_id = tok.convert_tokens_to_ids(name)
        assert tok(name, add_special_tokens=False)["input_ids"] == [token_id]
        ids = tok(f"abc {name}def\n", add_special_tokens=False)["input_ids"]
        assert ids.count(token_id) == 1
        assert tok.decode(ids) == f"abc {name}def\n"


def test_no_bos_added_and_byte_level_round_trip(tokenizer):
    _, _, tok = tokenizer
    text = "Return a new list; naïve café → 😀\n\tdone"
    ids = tok(text)["input_ids"]
    assert tok.bos_token_id not in ids and tok.eos_token_id not in ids
    assert tok.decode(ids) == text


def test_chat_template_two_turns_with_system(tokenizer):
    template, folder, tok = tokenizer
    rendered = tok.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert rendered == EXPECTED_CHAT[template]
    end = "<|assistant|>\n" if template == "phi3" else "<|im_start|>assistant<|im_sep|>"
    no_prompt = tok.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=False)
    assert no_prompt + end == rendered

    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(folder)
    assert reloaded.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True) == rendered
    assert reloaded(rendered)["input_ids"] == tok(rendered)["input_ids"]


# --------------------------------------------------------------------------- shipped checkpoint


def linear_widths(config) -> set[int]:
    head_dim = config.hidden_size // config.num_attention_heads
    qkv = (config.num_attention_heads + 2 * config.num_key_value_heads) * head_dim
    return {qkv, config.hidden_size, config.intermediate_size, 2 * config.intermediate_size}


def test_shipped_folder_contents():
    names = {p.name for p in TINY_PHI3_DIR.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", "heldout.txt", "README.md"} <= names
    assert sum(p.stat().st_size for p in TINY_PHI3_DIR.iterdir()) < 15 * 2**20
    config = json.loads((TINY_PHI3_DIR / "config.json").read_text())
    assert config["architectures"] == ["Phi3ForCausalLM"]
    assert config["dtype"] == "bfloat16"
    assert config["sliding_window"] == 2047 and config["max_position_embeddings"] == 4096
    assert config["hidden_size"] // config["num_attention_heads"] == 32
    assert config["num_key_value_heads"] == config["num_attention_heads"]
    assert config["tie_word_embeddings"] is False
    generation = json.loads((TINY_PHI3_DIR / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [3, 7]  # <|endoftext|>, <|end|>
    assert 20_000 < len((TINY_PHI3_DIR / "heldout.txt").read_text()) < 100_000


@pytest.fixture(scope="module")
def shipped():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(TINY_PHI3_DIR, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(TINY_PHI3_DIR)


def test_shipped_config_and_weights(shipped):
    import torch
    from safetensors import safe_open

    model, tok = shipped
    config = model.config
    assert config.vocab_size >= len(tok)
    assert config.vocab_size not in linear_widths(config)
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 3, 3)
    assert tok.convert_tokens_to_ids("<|end|>") == 7
    with safe_open(TINY_PHI3_DIR / "model.safetensors", "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118
        assert dtypes == {"BF16"}
        assert f.get_slice("lm_head.weight").get_shape() == [config.vocab_size, config.hidden_size]
    assert model.lm_head.weight.dtype == torch.float32


def test_shipped_heldout_perplexity(shipped):
    from phi_onnx.tiny.train import evaluate

    model, tok = shipped
    loss = evaluate(model, tok, (TINY_PHI3_DIR / "heldout.txt").read_text(encoding="utf-8"), seq_len=256)
    assert math.exp(loss) < HELDOUT_PPL_MAX


def test_shipped_model_answers_in_prose(shipped):
    from phi_onnx.tiny.train import sample_chat

    model, tok = shipped
    answers = [sample_chat(model, tok, q, max_new_tokens=60)
               for q in ("What does os.path.join do?", "Explain collections.Counter.")]
    assert any(a.endswith("<|end|>") for a in answers)
    for answer in answers:
        words = answer.removesuffix("<|end|>").split()
        assert len(words) >= 3
        assert sum(w.strip(".,;:()'\"`").isalpha() for w in words) >= 0.6 * len(words), answer


# --------------------------------------------------------------------------- training script


def test_train_script_smoke(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    out = tmp_path / "ckpt"
    cmd = [sys.executable, "-m", "phi_onnx.tiny.train", "--out", str(out), "--minutes", "0.1", "--seed", "1",
           "--hidden-size", "64", "--layers", "1", "--heads", "2", "--intermediate-size", "96",
           "--vocab-size", "600", "--seq-len", "64", "--batch-size", "4", "--max-steps", "4", "--max-docs", "400"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "val loss" in proc.stderr

    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert str(model.dtype) == "torch.bfloat16"
    assert len(tok) == 600 and model.config.vocab_size == 640  # 600 rounded up to a multiple of 64
    assert model.config.hidden_size == 64 and model.config.num_hidden_layers == 1
    assert GenerationConfig.from_pretrained(out).eos_token_id == [3, 7]
    assert (out / "heldout.txt").read_text().strip()
    assert "not a real Phi" in (out / "README.md").read_text()
    ids = tok("def f(x):", return_tensors="pt")["input_ids"]
    assert model(ids).logits.shape == (1, ids.shape[1], 640)
