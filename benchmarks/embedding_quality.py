"""int4 quality with and without a quantized embedding / 8-bit LM head, on the bundled tiny-phi3.

Against its fp32 export, on the second half of `heldout.txt` in 128-token windows (each window a
fresh prompt): top-1 agreement and KLD = mean KL(fp32 ‖ int4) per token, each with its standard
error over tokens, and the KLD change against the first variant with the standard error of the
paired per-token difference.

    python benchmarks/embedding_quality.py [--block-size 32] [--asymmetric]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from phi_onnx.export import ExportOptions, export
from phi_onnx.tiny import TINY_PHI3_DIR

WINDOW = 128
VARIANTS: dict[str, dict[str, object]] = {
    "int4 layers, fp32 embedding (before)": {"embeddings": "full"},
    "+ int4 embedding (default)": {},
    "+ int4 embedding, 8-bit head": {"lm_head_bits": 8},
    "+ int8 embedding, 8-bit head": {"embeddings": "int8", "lm_head_bits": 8},
}


def windows() -> np.ndarray:
    """[n, WINDOW] token ids from the second half of heldout.txt."""
    text = (TINY_PHI3_DIR / "heldout.txt").read_text()
    ids = Tokenizer.from_file(str(TINY_PHI3_DIR / "tokenizer.json")).encode(text[len(text) // 2:]).ids
    n = len(ids) // WINDOW
    return np.asarray(ids[: n * WINDOW], dtype=np.int64).reshape(n, WINDOW)


def log_probs(folder: Path, rows: np.ndarray) -> np.ndarray:
    """log-softmax of the logits for every position of every window (no cache: one pass each)."""
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    pasts = [i for i in session.get_inputs() if i.name.startswith("past_key_values")]
    out = []
    for row in rows:
        feeds = {"input_ids": row[None], "attention_mask": np.ones((1, WINDOW), np.int64)}
        for spec in pasts:
            feeds[spec.name] = np.zeros((1, spec.shape[1], 0, spec.shape[3]), np.float32)
        logits = session.run(["logits"], feeds)[0][0].astype(np.float64)
        out.append(logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True))
    return np.concatenate(out)


def mean_se(values: np.ndarray) -> tuple[float, float]:
    """Mean and its standard error."""
    return float(values.mean()), float(values.std(ddof=1) / np.sqrt(len(values)))


def main(argv: list[str] | None = None) -> None:
    """Print a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--asymmetric", action="store_true")
    args = parser.parse_args(argv)
    rows = windows()
    with tempfile.TemporaryDirectory() as tmp:
        export(TINY_PHI3_DIR, Path(tmp) / "fp32", ExportOptions(precision="fp32"))
        reference = log_probs(Path(tmp) / "fp32", rows)
        p = np.exp(reference)
        top1 = reference.argmax(-1)
        print(f"tiny-phi3, block {args.block_size}, {'asymmetric' if args.asymmetric else 'symmetric'}, "
              f"{reference.shape[0]} tokens ({len(rows)} x {WINDOW})\n")
        print("| variant | top-1 agreement | KLD ×1e3 | ΔKLD ×1e3 vs first |")
        print("|---|---|---|---|")
        first: np.ndarray | None = None
        for name, kw in VARIANTS.items():
            folder = Path(tmp) / name.replace(" ", "_").replace(",", "")
            export(TINY_PHI3_DIR, folder, ExportOptions(precision="int4", block_size=args.block_size,
                                                        symmetric=not args.asymmetric, **kw))  # type: ignore[arg-type]
            quantized = log_probs(folder, rows)
            kld = (p * (reference - quantized)).sum(-1)
            agree = (quantized.argmax(-1) == top1).astype(np.float64)
            (a, a_se), (k, k_se) = mean_se(agree), mean_se(kld)
            delta = "—"
            if first is None:
                first = kld
            else:
                d, d_se = mean_se(kld - first)
                delta = f"{d * 1e3:+.3f} ± {d_se * 1e3:.3f}"
            print(f"| {name} | {a:.4f} ± {a_se:.4f} | {k * 1e3:.3f} ± {k_se * 1e3:.3f} | {delta} |")


if __name__ == "__main__":
    main()
