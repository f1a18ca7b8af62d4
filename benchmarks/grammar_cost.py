"""Per-step cost of constrained decoding (phi_onnx.runtime.grammar) at batch 1 and 8.

Each step does what the sampler does for a grammar: the matcher consumes the chosen token, computes
the mask of allowed next tokens and masks the scores [vocab]. Rows follow a real JSON reply (valid
against the schema below), tokenized by the model's tokenizer. Batch 8 is timed both one row after
another (what each SequenceState does alone) and with `fill_masks` (all rows in one llguidance call on
its thread pool, as Generation and the Scheduler do before sampling).

Per mode: median/p95/mean milliseconds per step (all rows), `mask_mean_ms` the part spent computing
masks (the rest applies them to the scores with numpy), and `share_of_step_pct` the mean as a share
of a decode step of the model at the same batch: measured on `--model EXPORT` (a static batch of that
many rows, `Model.generate`, after a warm-up), else `--step-ms` for every batch.

Vocabularies: an export's or checkpoint's tokenizer.json (`--tokenizer FOLDER`, e.g. Phi-3's 32k),
and `--synthetic N`: a byte-level BPE vocabulary of N real byte strings (the most frequent pieces of
the Python standard library's sources) standing in for a 200k tokenizer (Phi-4-mini's is 200k).

Usage:
    python benchmarks/grammar_cost.py --tokenizer /tmp/phi-bench/phi3-mid --synthetic 200000 \
        --model /tmp/phi-bench/phi3-mid-int4
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from phi_onnx.runtime import grammar

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"}, "age": {"type": "integer"}, "email": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {"type": "object", "properties": {"street": {"type": "string"}, "city": {"type": "string"},
                                                     "zip": {"type": "string"}},
                    "required": ["street", "city", "zip"], "additionalProperties": False},
        "score": {"type": "number"},
    },
    "required": ["name", "age", "email", "tags", "address", "score"],
    "additionalProperties": False,
}
REPLY = {"name": "Ada Lovelace", "age": 36, "email": "ada@example.org",
         "tags": ["mathematics", "analytical engine", "poetry of science", "notes"],
         "address": {"street": "12 St James's Square", "city": "London", "zip": "SW1Y 4JH"}, "score": 97.5}


def synthetic_tokenizer(size: int, folder: Path) -> Path:
    """A byte-level BPE tokenizer.json whose vocabulary is `size` frequent byte strings of the stdlib."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_map = {b: c for b, c in zip(range(256), _bytes_to_unicode(), strict=True)}
    counts: collections.Counter[str] = collections.Counter()
    chunk = re.compile(r" ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+")
    total = 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        total += len(text)
        for piece in chunk.findall(text):
            mapped = "".join(byte_map[b] for b in piece.encode("utf-8"))
            for length in range(2, min(len(mapped), 16) + 1):
                for start in range(0, len(mapped) - length + 1):
                    counts[mapped[start:start + length]] += 1
        if len(counts) > 4 * size or total > 40_000_000:
            break
    vocab = {c: i for i, c in enumerate(sorted(set(alphabet)))}
    for piece, _ in counts.most_common():
        if len(vocab) >= size - 1:
            break
        vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder


def _bytes_to_unicode() -> list[str]:
    # GPT-2's reversible byte -> printable character map (the ByteLevel pre-tokenizer's alphabet)
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def measure(folder: Path, batch: int, steps_cap: int, repeat: int) -> dict[str, Any]:
    """Per-step milliseconds (median over steps, best of `repeat` passes) for one vocabulary and batch."""
    data = json.loads((folder / "tokenizer.json").read_text())
    from tokenizers import Tokenizer

    hf = Tokenizer.from_file(str(folder / "tokenizer.json"))
    vocab = hf.get_vocab_size(with_added_tokens=True)
    eos = [hf.token_to_id(t) for t in ("<|endoftext|>", "<|end|>") if hf.token_to_id(t) is not None]
    del data
    started = time.perf_counter()
    llt = grammar.grammar_tokenizer(folder, vocab, eos)
    tokenizer_s = time.perf_counter() - started
    reply = llt.tokenize_str(json.dumps(REPLY, separators=(",", ":")))[:steps_cap]
    started = time.perf_counter()
    processor = grammar.GrammarProcessor(grammar.json_schema(SCHEMA), llt, vocab)
    compile_s = time.perf_counter() - started
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((batch, vocab)).astype(np.float32)
    results: dict[str, Any] = {"vocab": vocab, "batch": batch, "steps": len(reply),
                               "tokenizer_build_s": round(tokenizer_s, 3),
                               "grammar_compile_ms": round(1e3 * compile_s, 2)}
    for mode in ("sequential", "fill_masks") if batch > 1 else ("sequential",):
        best: tuple[list[float], list[float]] | None = None
        for _ in range(repeat):
            rows = [processor.for_sequence() for _ in range(batch)]
            prompt = [0]
            times, masks = [], []
            for step in range(len(reply) + 1):
                tokens = prompt + reply[:step]
                scores = logits.copy()
                t0 = time.perf_counter()
                if mode == "fill_masks":
                    grammar.fill_masks([((row,), tokens) for row in rows])
                else:
                    for row in rows:
                        row.advance(tokens)
                        row.allowed()
                t1 = time.perf_counter()
                for b, row in enumerate(rows):
                    scores[b] = row(tokens, scores[b])  # applies the mask computed above
                times.append(time.perf_counter() - t0)
                masks.append(t1 - t0)
                assert np.isfinite(scores[0, reply[step]]) if step < len(reply) else True, "reply token masked"
            if best is None or statistics.fmean(times) < statistics.fmean(best[0]):
                best = (times, masks)
        assert best is not None
        times, masks = best
        results[mode] = {"median_ms": round(1e3 * statistics.median(times), 3),
                         "p95_ms": round(1e3 * float(np.percentile(times, 95)), 3),
                         "mean_ms": round(1e3 * statistics.fmean(times), 3),
                         "mask_mean_ms": round(1e3 * statistics.fmean(masks), 3)}
    return results


def decode_step_ms(model: Any, batch: int, new_tokens: int = 24) -> float:
    """Milliseconds of one decode step of a static batch of `batch` rows on a loaded `model` (median of 3)."""
    prompts = [[10 + b, 11, 12, 13, 14, 15, 16, 17] for b in range(batch)]
    model.generate(prompts, max_new_tokens=4)  # warm-up
    steps = []
    for _ in range(3):
        result = model.generate(prompts, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        row = result[0] if isinstance(result, list) else result
        steps.append(1e3 / row.decode_tokens_per_second)
    return statistics.median(steps)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", action="append", default=[], type=Path,
                        help="A folder with tokenizer.json (repeatable).")
    parser.add_argument("--synthetic", action="append", default=[], type=int, help="A synthetic vocabulary size.")
    parser.add_argument("--trained", action="append", default=[], type=int,
                        help="Train a Phi-style BPE of this size first (phi_onnx.tiny.build_tokenizer).")
    parser.add_argument("--batch", action="append", type=int, default=None, help="Batch sizes (default 1 and 8).")
    parser.add_argument("--steps", type=int, default=200, help="Most steps (tokens of the reply) per pass.")
    parser.add_argument("--repeat", type=int, default=3, help="Passes; the best is kept.")
    parser.add_argument("--step-ms", type=float, default=35.0,
                        help="A decode step of the model, to express the cost as a share of it.")
    parser.add_argument("--model", type=Path, default=None,
                        help="An export whose decode step (per batch size) replaces --step-ms.")
    parser.add_argument("--json", action="store_true", help="Print JSON lines only.")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="Keep built tokenizers here and reuse them (default: a temporary folder).")
    args = parser.parse_args(argv)
    folders = list(args.tokenizer)
    scratch = tempfile.TemporaryDirectory()
    work = args.work_dir or Path(scratch.name)
    for size in args.trained:
        from phi_onnx.tiny import build_tokenizer

        started = time.perf_counter()
        folder = work / f"trained-{size}"
        if not (folder / "tokenizer.json").exists():
            build_tokenizer(folder, vocab_size=size)
        folders.append(folder)
        if not args.json:
            print(f"# trained a {size}-token BPE in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    for size in args.synthetic:
        started = time.perf_counter()
        folder = work / f"synthetic-{size}"
        folders.append(folder if (folder / "tokenizer.json").exists() else synthetic_tokenizer(size, folder))
        if not args.json:
            print(f"# synthetic {size}-token vocabulary built in {time.perf_counter() - started:.1f} s",
                  file=sys.stderr)
    batches = args.batch or [1, 8]
    if args.model:
        import phi_onnx

        model = phi_onnx.load(args.model, backend="ort")  # once, for every batch size
        step_ms = {b: decode_step_ms(model, b) for b in batches}
        model.close()
    else:
        step_ms = dict.fromkeys(batches, args.step_ms)
    for folder in folders:
        for batch in batches:
            row = measure(folder, batch, args.steps, args.repeat)
            row["tokenizer"] = str(folder)
            row["decode_step_ms"] = round(step_ms[batch], 2)
            for mode in ("sequential", "fill_masks"):
                if mode in row:
                    row[mode]["share_of_step_pct"] = round(100 * row[mode]["mean_ms"] / step_ms[batch], 2)
            print(json.dumps(row))
    scratch.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
