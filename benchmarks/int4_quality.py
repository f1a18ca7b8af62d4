"""int4 quality per algorithm x block size: KL divergence and top-1 agreement against the fp32 export.

Exports CHECKPOINT in fp32 and in int4 with each algorithm and block size, runs every export on the
evaluation text (windows of --window tokens, each from an empty cache) and compares its next-token
distributions with the fp32 export's. Standard errors are over windows (tokens within a window are
correlated); each variant's KLD ratio and top-1 difference against `rtn` at block 32 are paired
(the same windows), with their own standard errors.

    python benchmarks/int4_quality.py phi_onnx/tiny/tiny-phi3 --text phi_onnx/tiny/tiny-phi3/heldout.txt \
        --embeddings full --lm-head-bits 4      # the layers' algorithms alone (the README's table)

For the export defaults against onnxruntime-genai's builder, see int4_defaults_quality.py.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from phi_onnx.export import ExportOptions, export


def windows_of(checkpoint: Path, text: Path, window: int, max_windows: int) -> np.ndarray:
    ids = Tokenizer.from_file(str(checkpoint / "tokenizer.json")).encode(text.read_text()).ids
    count = min(len(ids) // window, max_windows)
    return np.asarray(ids[: count * window], dtype=np.int64).reshape(count, window)


def log_probs(folder: Path, windows: np.ndarray) -> np.ndarray:
    """log-softmax of the logits of every window, float64 [windows, window, vocab]."""
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    decoder = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
    pasts = [i.name for i in session.get_inputs() if i.name.startswith("past_key_values")]
    out = []
    for row in windows:
        feeds = {"input_ids": row[None], "attention_mask": np.ones((1, row.size), np.int64)}
        feeds |= {name: np.zeros((1, decoder["num_key_value_heads"], 0, decoder["head_size"]), np.float32)
                  for name in pasts}
        logits = session.run(["logits"], feeds)[0][0].astype(np.float64)
        logits -= logits.max(-1, keepdims=True)
        out.append(logits - np.log(np.exp(logits).sum(-1, keepdims=True)))
    return np.stack(out)


def per_window(reference: np.ndarray, candidate: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean KL(reference || candidate), top-1 agreement) of each window."""
    kl = (np.exp(reference) * (reference - candidate)).sum(-1).mean(-1)
    top1 = (reference.argmax(-1) == candidate.argmax(-1)).mean(-1)
    return kl, top1


def se(values: np.ndarray) -> float:
    return float(values.std(ddof=1) / np.sqrt(values.size))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--text", type=Path, required=True, help="evaluation text (not the calibration text)")
    parser.add_argument("--calibration", default=None, help="calibration text file (default: built-in)")
    parser.add_argument("--algos", default="rtn,clip,gptq")
    parser.add_argument("--blocks", default="32,128")
    parser.add_argument("--asymmetric", action="store_true")
    parser.add_argument("--embeddings", default="auto", help="ExportOptions.embeddings (auto, full, int4, int8)")
    parser.add_argument("--lm-head-bits", type=int, default=None, help="ExportOptions.lm_head_bits (4 or 8)")
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--max-windows", type=int, default=200)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    windows = windows_of(args.checkpoint, args.text, args.window, args.max_windows)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        export(args.checkpoint, Path(tmp) / "fp32", ExportOptions(precision="fp32"))
        reference = log_probs(Path(tmp) / "fp32", windows)
        base: tuple[np.ndarray, np.ndarray] | None = None
        for block in (int(b) for b in args.blocks.split(",")):
            for algo in args.algos.split(","):
                folder = Path(tmp) / f"{algo}-{block}"
                calibration = args.calibration if algo != "rtn" and args.calibration else None
                result = export(args.checkpoint, folder, ExportOptions(
                    precision="int4", block_size=block, algo=algo, symmetric=not args.asymmetric,
                    calibration=calibration, embeddings=args.embeddings, lm_head_bits=args.lm_head_bits))
                kl, top1 = per_window(reference, log_probs(folder, windows))
                if base is None:
                    base = (kl, top1)  # the first variant (rtn at the first block size) is the baseline
                ratio = kl / base[0].mean()
                rows.append({"algo": algo, "block": block, "kld": kl.mean(), "kld_se": se(kl),
                             "top1": top1.mean(), "top1_se": se(top1), "kld_ratio": ratio.mean(),
                             "kld_ratio_se": se(ratio - base[0] / base[0].mean()),
                             "top1_gain": (top1 - base[1]).mean(), "top1_gain_se": se(top1 - base[1]),
                             "size_mb": sum(result.files.values()) / 1e6, "seconds": result.seconds})
                del result
    print(f"{windows.size} evaluation tokens ({windows.shape[0]} windows of {windows.shape[1]}); "
          f"baseline {rows[0]['algo']} block {rows[0]['block']}")
    print("| algo | block | KLD x1e3 (SE) | top-1 (SE) | KLD / baseline (SE of diff) | top-1 gain (SE) | MB | s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['algo']} | {r['block']} | {r['kld'] * 1e3:.2f} ({r['kld_se'] * 1e3:.2f}) | "
              f"{r['top1']:.4f} ({r['top1_se']:.4f}) | {r['kld_ratio']:.3f} ({r['kld_ratio_se']:.3f}) | "
              f"{r['top1_gain'] * 100:+.2f} pt ({r['top1_gain_se'] * 100:.2f}) | {r['size_mb']:.2f} | "
              f"{r['seconds']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2, default=float))


if __name__ == "__main__":
    main()
