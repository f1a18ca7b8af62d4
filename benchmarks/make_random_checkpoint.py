"""Write a random, Phi-3-shaped bf16 checkpoint (sharded safetensors) straight from numpy.

No torch and no model object: every tensor is generated in row chunks and appended to its shard,
so the writer itself stays at a few hundred MB however large the checkpoint is. The folder is a
Hugging Face model folder that both phi-onnx and onnxruntime-genai's model builder accept
(config.json in transformers-4 hub spelling, generation_config.json, a tokenizer).

    python benchmarks/make_random_checkpoint.py --preset phi3-mini --out /tmp/phi-bench/phi3-mini
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import ml_dtypes
import numpy as np

BF16 = np.dtype(ml_dtypes.bfloat16)
CHUNK_ELEMENTS = 16 * 1024 * 1024  # rows are generated in ~16 M-element blocks (32 MB of bf16)
IN_FLIGHT = 4  # blocks generated ahead of the writer


@dataclass(frozen=True)
class Shape:
    """The dimensions of a Phi3ForCausalLM."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    max_positions: int = 4096
    tied: bool = False  # tie_word_embeddings: no lm_head.weight, the LM head reads the embedding
    rotary: float = 1.0  # partial_rotary_factor

    @property
    def head_dim(self) -> int:
        """Per-head width."""
        return self.hidden // self.heads


PRESETS: dict[str, Shape] = {
    "phi3-mini": Shape(hidden=3072, layers=32, heads=32, kv_heads=32, intermediate=8192, vocab=32064),
    "phi3-mid": Shape(hidden=2048, layers=16, heads=32, kv_heads=32, intermediate=5632, vocab=32064),
    "phi4-mini": Shape(hidden=3072, layers=32, heads=24, kv_heads=8, intermediate=8192, vocab=200064, tied=True,
                       rotary=0.75),
    "phi4": Shape(hidden=5120, layers=40, heads=40, kv_heads=10, intermediate=17920, vocab=100352),
}


def tensor_shapes(s: Shape) -> Iterator[tuple[str, tuple[int, ...]]]:
    """Every tensor of the checkpoint, in transformers' order, with its shape."""
    h, qkv = s.hidden, (s.heads + 2 * s.kv_heads) * s.head_dim
    yield "model.embed_tokens.weight", (s.vocab, h)
    for i in range(s.layers):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (h,)
        yield p + "self_attn.qkv_proj.weight", (qkv, h)
        yield p + "self_attn.o_proj.weight", (h, s.heads * s.head_dim)
        yield p + "post_attention_layernorm.weight", (h,)
        yield p + "mlp.gate_up_proj.weight", (2 * s.intermediate, h)
        yield p + "mlp.down_proj.weight", (h, s.intermediate)
    yield "model.norm.weight", (h,)
    if not s.tied:
        yield "lm_head.weight", (s.vocab, h)


def _nbytes(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape, dtype=np.int64)) * BF16.itemsize


def plan_shards(s: Shape, shard_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Group tensors, in order, into shards of at most ~`shard_bytes` (one tensor may exceed it)."""
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in tensor_shapes(s):
        if shards[-1] and size + _nbytes(shape) > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += _nbytes(shape)
    return shards


def _random_block(seed: int, index: int, shape: tuple[int, int]) -> np.ndarray:
    """N(0, 0.02) in bf16, from its own generator so blocks can be made on any thread."""
    block = np.random.default_rng([seed, index]).standard_normal(shape, dtype=np.float32)
    block *= 0.02
    return block.astype(BF16)


def _blocks(tensors: list[tuple[str, tuple[int, ...]]], first: int) -> Iterator[tuple[int, int, int]]:
    """(block index, rows) jobs for the random matrices; norms (1-D) are skipped, they are all ones."""
    index = first
    for _, shape in tensors:
        if len(shape) == 1:
            continue
        rows, cols = shape
        step = max(1, CHUNK_ELEMENTS // cols)
        for start in range(0, rows, step):
            yield index, min(step, rows - start), cols
            index += 1


def write_shard(path: Path, tensors: list[tuple[str, tuple[int, ...]]], seed: int, first_block: int,
                pool: ThreadPoolExecutor) -> int:
    """Write one safetensors file: 8-byte header length, JSON header, then raw little-endian data.

    Random blocks are generated on `pool` a few ahead of the writer (bounded memory). Returns the
    next free block index, so every block of the checkpoint has its own deterministic seed.
    """
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in tensors:
        end = offset + _nbytes(shape)
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # data starts 8-byte aligned, as safetensors writes it
    with path.open("wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        jobs = _blocks(tensors, first_block)
        window: deque[Future[np.ndarray]] = deque()
        last = first_block - 1

        def submit() -> None:
            nonlocal last
            job = next(jobs, None)
            if job is not None:
                last = job[0]
                window.append(pool.submit(_random_block, seed, job[0], (job[1], job[2])))

        for _ in range(IN_FLIGHT):
            submit()
        for _name, shape in tensors:
            if len(shape) == 1:
                handle.write(memoryview(np.ones(shape, dtype=BF16).view(np.uint8)))
                continue
            rows, cols = shape
            for _ in range(0, rows, max(1, CHUNK_ELEMENTS // cols)):
                block = window.popleft().result()
                submit()
                handle.write(memoryview(block.view(np.uint8)))
    return last + 1


def write_tokenizer(folder: Path) -> tuple[int, int]:
    """Save a Phi-3-style tokenizer into `folder`; returns its (bos, eos) ids.

    Uses phi-onnx's offline tokenizer builder when present, else a byte-level BPE without merges.
    """
    try:
        from phi_onnx.tiny import build_tokenizer
    except ImportError:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        byte_chars = sorted(pre_tokenizers.ByteLevel.alphabet())
        vocab = {tok: i for i, tok in enumerate(["<unk>", "<s>", "</s>", *byte_chars, "<|endoftext|>"])}
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|endoftext|>",
                                     pad_token="<|endoftext|>", unk_token="<unk>")
        hf.save_pretrained(folder)
    else:
        hf = build_tokenizer(folder, vocab_size=2000)
    return int(hf.bos_token_id), int(hf.eos_token_id)


def write_config(folder: Path, s: Shape, bos: int, eos: int) -> None:
    """config.json (transformers-4 hub spelling, like Phi-3-mini-4k-instruct's) and generation_config.json."""
    config = {
        "architectures": ["Phi3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": bos,
        "embd_pdrop": 0.0,
        "eos_token_id": eos,
        "hidden_act": "silu",
        "hidden_size": s.hidden,
        "initializer_range": 0.02,
        "intermediate_size": s.intermediate,
        "max_position_embeddings": s.max_positions,
        "model_type": "phi3",
        "num_attention_heads": s.heads,
        "num_hidden_layers": s.layers,
        "num_key_value_heads": s.kv_heads,
        "original_max_position_embeddings": s.max_positions,
        "pad_token_id": eos,
        "resid_pdrop": 0.0,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "sliding_window": 2047,
        "tie_word_embeddings": s.tied,
        "partial_rotary_factor": s.rotary,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.40.2",
        "use_cache": True,
        "vocab_size": s.vocab,
    }
    generation = {"bos_token_id": bos, "eos_token_id": [eos], "pad_token_id": eos,
                  "transformers_version": "4.40.2"}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def make_checkpoint(out: Path, shape: Shape, *, shard_bytes: int = 2 * 1024**3, seed: int = 0,
                    threads: int = 2) -> int:
    """Write the whole checkpoint folder; returns the number of parameters."""
    out.mkdir(parents=True, exist_ok=True)
    shards = plan_shards(shape, shard_bytes)
    weight_map: dict[str, str] = {}
    total = 0
    block = 0
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for i, tensors in enumerate(shards, start=1):
            file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            block = write_shard(out / file, tensors, seed, block, pool)
            for name, dims in tensors:
                weight_map[name] = file
                total += _nbytes(dims)
            print(f"  wrote {file} ({sum(_nbytes(d) for _, d in tensors) / 1e9:.2f} GB)", file=sys.stderr)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    bos, eos = write_tokenizer(out)
    write_config(out, shape, bos, eos)
    return total // BF16.itemsize


def main(argv: list[str] | None = None) -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="phi3-mini")
    parser.add_argument("--layers", type=int, help="override the preset's number of layers")
    parser.add_argument("--out", type=Path, required=True, help="checkpoint folder to create")
    parser.add_argument("--shard-gb", type=float, default=2.0, help="approximate shard size in GiB")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="threads generating random values")
    args = parser.parse_args(argv)
    shape = PRESETS[args.preset]
    if args.layers is not None:
        shape = replace(shape, layers=args.layers)
    started = time.perf_counter()
    params = make_checkpoint(args.out, shape, shard_bytes=int(args.shard_gb * 1024**3), seed=args.seed,
                             threads=args.threads)
    print(f"{args.out}: {params / 1e9:.2f} B parameters in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
