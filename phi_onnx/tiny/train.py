"""Train the tiny Phi-3 that ships in ``phi_onnx/tiny/tiny-phi3``.

Usage::

    python -m phi_onnx.tiny.train --out DIR [--minutes M] [--seed S] [--arch phi3|phi2|phimoe]

Everything is offline: the tokenizer and the training text both come from the
Python standard library's sources (parsed with :mod:`ast`, never imported).  The
corpus mixes chat examples (``"What does json.dumps do?"`` -> first paragraph of
its docstring, rendered with the tokenizer's Phi-3 chat template) and plain
docstring text.  A fixed ~5% of the documents (chosen by a hash of their name,
independent of ``--seed``) is held out and written to ``DIR/heldout.txt``.

The model is a miniature Phi-3-mini (MHA, head_dim 32, sliding window 2047, RoPE
theta 10000, untied embeddings) trained for ``--minutes`` of wall time and saved
in bfloat16 like real Phi checkpoints.  The weights are *not* a real Phi.

``--arch phi2`` trains a miniature Phi-2 (``PhiForCausalLM``: LayerNorm, parallel attention/MLP,
partial rotary 0.5, biases) and ``--arch phimoe`` a miniature Phi-3.5-MoE (``PhimoeForCausalLM``:
4 experts, top-2 sparse mixer) on the same tokenizer and corpus; the tests train those with
``--max-steps`` so they are judged on a trained model.
"""

from __future__ import annotations

import argparse
import ast
import logging
import math
import random
import re
import sysconfig
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    GenerationConfig,
    Phi3Config,
    Phi3ForCausalLM,
    PhiConfig,
    PhiForCausalLM,
    PhimoeConfig,
    PhimoeForCausalLM,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from phi_onnx.tiny.tokenizer import build_tokenizer

log = logging.getLogger("phi_onnx.tiny.train")

SYSTEM_PROMPT = "You are a helpful assistant that explains the Python standard library."
#: stdlib folders that hold tests, demos, vendored code or build data: skipped.
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "idlelib", "turtledemo", "lib2to3", "ensurepip"}
HELDOUT_EVERY = 20  # 1 document in 20 (5%) is held out
HELDOUT_MAX_CHARS = 48_000
CHAT_REPEATS = 2  # chat examples per documented object (different question wordings)
PLAIN_MAX_CHARS = 1200

QUESTIONS = {
    "function": ("What does {name} do?", "Explain {name}.", "What is {name} used for?", "Describe {name}."),
    "class": ("What is {name}?", "Explain the {name} class.", "What is the {name} class for?", "Describe {name}."),
    "module": ("What is the {name} module?", "What does the {name} module do?", "Explain the {name} module."),
}


@dataclass(frozen=True)
class Doc:
    """One documented stdlib object: its dotted name, kind and cleaned docstring."""

    name: str
    kind: str  # "module" | "class" | "function"
    doc: str


@dataclass(frozen=True)
class ModelShape:
    """The few knobs of the miniature Phi-3 architecture."""

    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 8
    intermediate_size: int = 768


# --------------------------------------------------------------------------- corpus


def stdlib_files() -> Iterator[tuple[str, Path]]:
    """Yield ``(module_name, path)`` for public stdlib modules, in sorted order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if any(p in SKIP_DIRS or (p.startswith(("config-", "_")) and p != "__init__") for p in parts):
            continue
        mod = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if mod:
            yield mod, path


def _is_public(node: ast.stmt, kinds: tuple[type, ...]) -> bool:
    """Whether ``node`` is one of ``kinds`` with a name not starting with an underscore."""
    return isinstance(node, kinds) and not node.name.startswith("_")  # type: ignore[attr-defined]


def iter_docs(module: str, tree: ast.Module) -> Iterator[Doc]:
    """Yield the module, its public top-level functions/classes and public methods."""
    funcs = (ast.FunctionDef, ast.AsyncFunctionDef)
    if text := ast.get_docstring(tree):
        yield Doc(module, "module", text)
    for node in tree.body:
        name = f"{module}.{getattr(node, 'name', '')}"
        if _is_public(node, funcs) and (text := ast.get_docstring(node)):  # type: ignore[arg-type]
            yield Doc(name, "function", text)
        elif _is_public(node, (ast.ClassDef,)):
            if text := ast.get_docstring(node):  # type: ignore[arg-type]
                yield Doc(name, "class", text)
            for item in node.body:  # type: ignore[attr-defined]
                if _is_public(item, funcs) and (text := ast.get_docstring(item)):
                    yield Doc(f"{name}.{item.name}", "function", text)


def collect_docs(max_docs: int | None = None) -> list[Doc]:
    """Parse public stdlib modules with :mod:`ast` (in sorted order) and return their documented objects."""
    docs: list[Doc] = []
    for module, path in stdlib_files():
        if max_docs is not None and len(docs) >= max_docs:
            break
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError):
            continue
        docs.extend(iter_docs(module, tree))
    return docs[:max_docs]


def first_paragraph(doc: str) -> str | None:
    """The first paragraph of ``doc`` as one line, or ``None`` if it is not usable prose."""
    para = re.sub(r"\s+", " ", doc.strip().split("\n\n", 1)[0]).strip()
    if not 20 <= len(para) <= 500 or ">>>" in para or not re.search(r"[a-z]{3}", para):
        return None
    return para


def chat_example(d: Doc, tokenizer: PreTrainedTokenizerFast, rng: random.Random) -> str | None:
    """Render a question/answer about ``d`` with the chat template (ends with ``<|end|>``)."""
    answer = first_paragraph(d.doc)
    if answer is None:
        return None
    messages = [{"role": "user", "content": rng.choice(QUESTIONS[d.kind]).format(name=d.name)},
                {"role": "assistant", "content": answer}]
    if rng.random() < 0.3:
        messages.insert(0, {"role": "system", "content": SYSTEM_PROMPT})
    return tokenizer.apply_chat_template(messages, tokenize=False).rstrip("\n")


def plain_text(d: Doc) -> str:
    """The docstring as plain text, headed by the object's name (capped in length)."""
    return f"{d.name}\n\n{d.doc.strip()}"[:PLAIN_MAX_CHARS]


def is_heldout(name: str) -> bool:
    """Fixed, seed-independent 5% split on the object's name."""
    return zlib.crc32(name.encode()) % HELDOUT_EVERY == 0


def build_corpus(
    tokenizer: PreTrainedTokenizerFast, seed: int, max_docs: int | None = None
) -> tuple[list[str], list[str]]:
    """Return ``(train_texts, heldout_texts)``: chat examples plus plain docstrings."""
    rng = random.Random(seed)
    docs = collect_docs(max_docs)
    train: list[str] = []
    heldout: list[str] = []
    for d in docs:
        chats = [chat_example(d, tokenizer, rng) for _ in range(CHAT_REPEATS)]
        texts = [t for t in (*dict.fromkeys(chats), plain_text(d)) if t]
        (heldout if is_heldout(d.name) else train).extend(texts)
    rng.shuffle(train)
    random.Random(0).shuffle(heldout)
    return train, heldout


def heldout_text(texts: list[str], eos: str, max_chars: int = HELDOUT_MAX_CHARS) -> str:
    """Join held-out documents with ``eos`` up to ``max_chars`` characters."""
    out: list[str] = []
    size = 0
    for t in texts:
        if size + len(t) > max_chars:
            continue
        out.append(t)
        size += len(t) + len(eos)
    return eos.join(out) + "\n"


def tokenize_stream(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> torch.Tensor:
    """Encode ``texts`` into one 1-D id stream, each document followed by EOS."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for enc in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


# --------------------------------------------------------------------------- model


def padded_vocab_size(n_tokens: int, forbidden: set[int], multiple: int = 64) -> int:
    """Round ``n_tokens`` up to ``multiple``, skipping sizes in ``forbidden``."""
    size = -(-n_tokens // multiple) * multiple
    while size in forbidden:
        size += multiple
    return size


def make_config(tokenizer: PreTrainedTokenizerFast, shape: ModelShape) -> Phi3Config:
    """A miniature Phi-3-mini-4k config whose vocab size differs from every linear width."""
    head_dim = shape.hidden_size // shape.num_heads
    linear_widths = {
        3 * shape.hidden_size,  # qkv_proj (MHA: q + k + v)
        shape.hidden_size,  # o_proj, down_proj
        2 * shape.intermediate_size,  # gate_up_proj
        shape.intermediate_size,
        head_dim,
    }
    return Phi3Config(
        vocab_size=padded_vocab_size(len(tokenizer), linear_widths),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_heads,
        max_position_embeddings=4096,
        original_max_position_embeddings=4096,
        sliding_window=2047,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


ARCHS = ("phi3", "phi2", "phimoe")


def make_arch_config(arch: str, tokenizer: PreTrainedTokenizerFast, shape: ModelShape) -> PreTrainedConfig:
    """The miniature config of ``arch`` (``phi3`` is :func:`make_config`); vocab differs from every linear width."""
    if arch == "phi3":
        return make_config(tokenizer, shape)
    head_dim = shape.hidden_size // shape.num_heads
    widths = {3 * shape.hidden_size, shape.hidden_size, shape.intermediate_size, 2 * shape.intermediate_size,
              head_dim}
    common = {
        "vocab_size": padded_vocab_size(len(tokenizer), widths), "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size, "num_hidden_layers": shape.num_layers,
        "num_attention_heads": shape.num_heads, "num_key_value_heads": shape.num_heads,
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id, "tie_word_embeddings": False,
    }
    if arch == "phi2":
        # Phi-2: partial rotary (here 0.5 of head_dim, Phi-2 uses 0.4 of 80), LayerNorm, biases.
        return PhiConfig(**common, partial_rotary_factor=0.5, max_position_embeddings=2048, layer_norm_eps=1e-5,
                         rope_theta=10000.0)
    if arch == "phimoe":
        # Phi-3.5-MoE: 4 experts (Phi-3.5-MoE has 16), 2 per token, attention and LM head biases.
        return PhimoeConfig(**common, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=4096,
                            rms_norm_eps=1e-5, attention_bias=True, lm_head_bias=True,
                            rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")


def make_model(arch: str, config: PreTrainedConfig) -> PreTrainedModel:
    """The randomly initialised causal LM of ``arch``."""
    cls = {"phi3": Phi3ForCausalLM, "phi2": PhiForCausalLM, "phimoe": PhimoeForCausalLM}[arch]
    return cls(config)


def lr_at(progress: float, base_lr: float, warmup: float = 0.03, floor: float = 0.1) -> float:
    """Linear warmup then cosine decay to ``floor * base_lr``; ``progress`` in [0, 1]."""
    if progress < warmup:
        return base_lr * max(progress / warmup, 0.01)
    t = min((progress - warmup) / (1 - warmup), 1.0)
    return base_lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


def train(
    model: PreTrainedModel,
    stream: torch.Tensor,
    *,
    minutes: float,
    seq_len: int,
    batch_size: int,
    lr: float,
    seed: int,
    max_steps: int | None = None,
    log_every: int = 25,
) -> int:
    """Train on random ``seq_len`` windows of ``stream`` for ``minutes``; return the step count."""
    gen = torch.Generator().manual_seed(seed)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.95), eps=1e-8,
    )
    budget = max(minutes * 60.0, 1e-3)
    model.train()
    start = time.monotonic()
    step = 0
    while True:
        progress = (time.monotonic() - start) / budget
        if max_steps is not None:
            progress = max(progress, step / max_steps)
        if progress >= 1.0 and step > 0:
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(min(progress, 1.0), lr)
        starts = torch.randint(0, len(stream) - seq_len, (batch_size,), generator=gen)
        batch = torch.stack([stream[s : s + seq_len] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss  # the model shifts labels itself
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % log_every == 0:
            log.info("step %d  loss %.4f  lr %.2e  %.0fs", step, loss.item(), opt.param_groups[0]["lr"],
                     time.monotonic() - start)
    log.info("trained %d steps in %.1f s", step, time.monotonic() - start)
    return step


@torch.no_grad()
def evaluate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, text: str, seq_len: int = 256) -> float:
    """Mean next-token loss (nats) of ``model`` on ``text`` in non-overlapping ``seq_len`` windows."""
    ids = torch.tensor(tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids)
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(ids) - 1, seq_len):
        chunk = ids[i : i + seq_len + 1]
        if len(chunk) < 2:
            break
        logits = model(input_ids=chunk[None, :-1]).logits[0].float()
        total += torch.nn.functional.cross_entropy(logits, chunk[1:], reduction="sum").item()
        count += len(chunk) - 1
    return total / count


def sample_chat(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, question: str, max_new_tokens: int = 60
) -> str:
    """Greedy answer of ``model`` to ``question`` (special tokens kept)."""
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1] :])


# --------------------------------------------------------------------------- output


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, out: Path) -> None:
    """Save bf16 safetensors weights plus a Phi-3-like generation config."""
    model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|end|>")],
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(out, safe_serialization=True)


TITLES = {"phi3": "Phi-3-mini", "phi2": "Phi-2", "phimoe": "Phi-3.5-MoE"}


def write_readme(
    out: Path,
    args: argparse.Namespace,
    tokenizer: PreTrainedTokenizerFast,
    config: PreTrainedConfig,
    steps: int,
    val_loss: float,
    n_params: int,
) -> None:
    """Describe the checkpoint: what it is, how it was made, and how good it is."""
    arch_flag = "" if args.arch == "phi3" else f" --arch {args.arch}"
    specials = ", ".join(f"`{t}` {tokenizer.convert_tokens_to_ids(t)}" for t in tokenizer.added_tokens_encoder)
    (out / "README.md").write_text(
        f"""# tiny-{args.arch}

A miniature **{TITLES[args.arch]}-shaped** causal LM (`{type(config).__name__.replace("Config", "ForCausalLM")}`,
{n_params / 1e6:.2f} M parameters)
used by `phi_onnx` to test ONNX export offline. **The weights are not a real Phi**: they were
trained from scratch for a few minutes on CPU, on docstrings of the Python standard library
(plain text plus Phi-3 chat-formatted "What does X do?" questions answered by the first
paragraph of X's docstring). Expect fluent-looking but mostly wrong answers.

- shape: hidden {config.hidden_size}, {config.num_hidden_layers} layers, {config.num_attention_heads} heads
  ({config.num_key_value_heads} KV heads, head_dim {config.hidden_size // config.num_attention_heads}),
  intermediate {config.intermediate_size}, vocab_size {config.vocab_size} ({len(tokenizer)} tokenizer tokens),
  sliding_window {getattr(config, "sliding_window", None)},
  max_position_embeddings {config.max_position_embeddings},
  untied embeddings
- tokenizer: byte-level BPE trained on stdlib sources (`phi_onnx.tiny.build_tokenizer`), Phi-3 chat template;
  special tokens: {specials}
- weights: bfloat16 safetensors; `generation_config.json` stops on `<|endoftext|>` and `<|end|>`

## How it was trained

```
python -m phi_onnx.tiny.train --out {args.out} --minutes {args.minutes:g} --seed {args.seed}{arch_flag}
```

{steps} AdamW steps (batch {args.batch_size} x {args.seq_len} tokens, peak lr {args.lr:g}, cosine decay over
the {args.minutes:g}-minute budget, 2 CPU threads). The budget is wall time, so a rerun gives a similar,
not bit-identical, model.

Validation on `heldout.txt` (a fixed 5% of the documents, never trained on), bf16 weights:
loss **{val_loss:.4f}** nats/token, perplexity **{math.exp(val_loss):.2f}**.
""",
        encoding="utf-8",
    )


# --------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; the architecture/optimiser knobs are hidden (for tests)."""
    p = argparse.ArgumentParser(prog="python -m phi_onnx.tiny.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="output folder for the checkpoint")
    p.add_argument("--minutes", type=float, default=6.0, help="training wall-time budget (default 6)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--arch", choices=ARCHS, default="phi3",
                   help="architecture: phi3 (default, Phi-3-mini), phi2 (Phi-2) or phimoe (Phi-3.5-MoE)")
    hidden = argparse.SUPPRESS
    p.add_argument("--hidden-size", type=int, default=ModelShape.hidden_size, help=hidden)
    p.add_argument("--layers", type=int, default=ModelShape.num_layers, help=hidden)
    p.add_argument("--heads", type=int, default=ModelShape.num_heads, help=hidden)
    p.add_argument("--intermediate-size", type=int, default=ModelShape.intermediate_size, help=hidden)
    p.add_argument("--vocab-size", type=int, default=2000, help=hidden)
    p.add_argument("--seq-len", type=int, default=256, help=hidden)
    p.add_argument("--batch-size", type=int, default=8, help=hidden)
    p.add_argument("--lr", type=float, default=2e-3, help=hidden)
    p.add_argument("--max-steps", type=int, default=None, help=hidden)
    p.add_argument("--max-docs", type=int, default=None, help=hidden)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Build tokenizer and corpus, train, evaluate and save the tiny model (``--arch``) into ``--out``."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = build_tokenizer(out, vocab_size=args.vocab_size, template="phi3")
    train_texts, held = build_corpus(tokenizer, args.seed, args.max_docs)
    heldout = heldout_text(held, tokenizer.eos_token)
    (out / "heldout.txt").write_text(heldout, encoding="utf-8")
    stream = tokenize_stream(tokenizer, train_texts)
    log.info("corpus: %d train docs (%d tokens), heldout %d chars", len(train_texts), len(stream), len(heldout))

    shape = ModelShape(args.hidden_size, args.layers, args.heads, args.intermediate_size)
    config = make_arch_config(args.arch, tokenizer, shape)
    model = make_model(args.arch, config)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: %.2f M parameters, vocab_size %d", n_params / 1e6, config.vocab_size)

    steps = train(model, stream, minutes=args.minutes, seq_len=args.seq_len, batch_size=args.batch_size,
                  lr=args.lr, seed=args.seed, max_steps=args.max_steps)
    save_model(model, tokenizer, out)
    model.float()  # exact upcast of the saved bf16 weights
    val_loss = evaluate(model, tokenizer, heldout, args.seq_len)
    log.info("val loss (bf16 weights) %.4f  perplexity %.2f", val_loss, math.exp(val_loss))
    log.info("sample: %r", sample_chat(model, tokenizer, "What does os.path.join do?"))
    write_readme(out, args, tokenizer, config, steps, val_loss, n_params)


if __name__ == "__main__":
    main()
