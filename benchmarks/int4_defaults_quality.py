"""int4 variants against onnxruntime-genai's builder int4: KL(fp32 ‖ int4), top-1 and file size, paired.

Exports CHECKPOINT in fp32, in the builder's int4 (`python -m onnxruntime_genai.models.builder -p int4 -e cpu`:
round-to-nearest, block 32, full-precision embedding, 4-bit LM head) and in each named variant, runs every
export on the evaluation text (windows of --window tokens, each from an empty cache) and compares its
next-token distributions with the fp32 export's. The KLD ratio and the top-1 difference against the anchor
are paired over the same windows, with standard errors over windows. Where the builder cannot export the
model (Phi-3.5-MoE), `--anchor ours` uses our export of the same layout (rtn block 32, full embedding, 4-bit
head), which measured the same as the builder's on tiny-phi3 and the trained Phi-2 (see the README).

    python benchmarks/int4_defaults_quality.py phi_onnx/tiny/tiny-phi3 --variants defaults
    python benchmarks/int4_defaults_quality.py CKPT --variants "mine=algo:clip,embeddings:int8,lm_head_bits:8"

A variant is NAME=key:value,... (ExportOptions fields; numbers are parsed) or the name of a preset list
(`--variants defaults`, `embeddings`, `algos`, `blocks`, `mix`); several are separated by `;`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from int4_quality import log_probs, per_window, se, windows_of

from phi_onnx.export import ExportOptions, export

#: Named lists of variants (ExportOptions keyword arguments, all int4).
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "embeddings": {
        "rtn-32 full emb, 4-bit head (builder's layout)": {"algo": "rtn", "embeddings": "full", "lm_head_bits": 4},
        "rtn-32 int4 emb, 4-bit head": {"algo": "rtn", "embeddings": "int4", "lm_head_bits": 4},
        "rtn-32 int8 emb, 4-bit head": {"algo": "rtn", "embeddings": "int8", "lm_head_bits": 4},
        "rtn-32 full emb, 8-bit head": {"algo": "rtn", "embeddings": "full", "lm_head_bits": 8},
        "rtn-32 int8 emb, 8-bit head": {"algo": "rtn", "embeddings": "int8", "lm_head_bits": 8},
        "rtn-32 int4 emb, 8-bit head": {"algo": "rtn", "embeddings": "int4", "lm_head_bits": 8},
    },
    "algos": {
        "clip-32 full emb, 4-bit head": {"algo": "clip", "embeddings": "full", "lm_head_bits": 4},
        "clip-32 int8 emb, 8-bit head": {"algo": "clip", "embeddings": "int8", "lm_head_bits": 8},
        "clip-32 full emb, 8-bit head": {"algo": "clip", "embeddings": "full", "lm_head_bits": 8},
        "clip-32 int4 emb, 8-bit head": {"algo": "clip", "embeddings": "int4", "lm_head_bits": 8},
        "gptq-128 int4 emb, 4-bit head": {"algo": "gptq", "block_size": 128, "embeddings": "int4",
                                          "lm_head_bits": 4},
        "gptq-128 full emb, 4-bit head": {"algo": "gptq", "block_size": 128, "embeddings": "full",
                                          "lm_head_bits": 4},
        "gptq-128 int8 emb, 8-bit head": {"algo": "gptq", "block_size": 128, "embeddings": "int8",
                                          "lm_head_bits": 8},
        "gptq-32 int8 emb, 8-bit head": {"algo": "gptq", "block_size": 32, "embeddings": "int8",
                                         "lm_head_bits": 8},
    },
    "blocks": {
        "clip-64 int8 emb, 8-bit head": {"algo": "clip", "block_size": 64, "embeddings": "int8", "lm_head_bits": 8},
        "clip-128 int8 emb, 8-bit head": {"algo": "clip", "block_size": 128, "embeddings": "int8",
                                          "lm_head_bits": 8},
        "rtn-128 int8 emb, 8-bit head": {"algo": "rtn", "block_size": 128, "embeddings": "int8", "lm_head_bits": 8},
    },
    "defaults": {
        "before: rtn, int4 embedding, 4-bit head": {"algo": "rtn", "embeddings": "int4", "lm_head_bits": 4},
        "default (no options)": {},
        "--algo clip": {"algo": "clip"},
        "--block-size 64": {"block_size": 64},
        "--algo gptq": {"algo": "gptq"},
        "--algo gptq --block-size 128": {"algo": "gptq", "block_size": 128},
        "--embeddings int4": {"embeddings": "int4"},
        "--embeddings int4 --lm-head-bits 4": {"embeddings": "int4", "lm_head_bits": 4},
    },
    "mix": {
        "--mix auto (+10 %)": {"mix": "auto"},
        "--mix auto --mix-budget 0.05": {"mix": "auto", "mix_budget": 0.05},
        "--algo gptq --mix auto": {"algo": "gptq", "mix": "auto"},
        "--algo gptq --block-size 128 --mix auto": {"algo": "gptq", "block_size": 128, "mix": "auto"},
    },
}


def parse_variants(spec: str) -> dict[str, dict[str, Any]]:
    """`NAME=key:value,...;PRESET;...` → {name: ExportOptions keyword arguments}."""
    variants: dict[str, dict[str, Any]] = {}
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        if "=" not in part:
            variants.update(PRESETS[part])
            continue
        name, _, body = part.partition("=")
        kwargs: dict[str, Any] = {}
        for item in filter(None, body.split(",")):
            key, _, value = item.partition(":")
            try:
                kwargs[key] = json.loads(value)
            except json.JSONDecodeError:
                kwargs[key] = value
        variants[name] = kwargs
    return variants


def weights_bytes(folder: Path) -> int:
    """Bytes of model.onnx and model.onnx.data (the model; tokenizer and configs left out)."""
    return sum((folder / name).stat().st_size for name in ("model.onnx", "model.onnx.data")
               if (folder / name).is_file())


def builder_export(checkpoint: Path, out: Path, cache: Path) -> float:
    """onnxruntime-genai's builder int4 for CPU, as the project's anchors ran it; returns its seconds."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(checkpoint), "-o", str(out),
                    "-p", "int4", "-e", "cpu", "-c", str(cache)], check=True, capture_output=True)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--text", type=Path, default=None, help="evaluation text (default: CHECKPOINT/heldout.txt)")
    parser.add_argument("--variants", default="embeddings;algos;blocks;defaults")
    parser.add_argument("--anchor", choices=["builder", "ours"], default="builder",
                        help="builder: onnxruntime-genai's int4; ours: rtn-32, full embedding, 4-bit head")
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--max-windows", type=int, default=200)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    variants = parse_variants(args.variants)
    text = args.text or args.checkpoint / "heldout.txt"
    windows = windows_of(args.checkpoint, text, args.window, args.max_windows)
    rows: list[dict[str, Any]] = []
    print(f"{args.checkpoint.name}: {windows.size} evaluation tokens ({windows.shape[0]} windows of "
          f"{windows.shape[1]}) of {text.name}; {os.cpu_count()} CPUs")
    print("| variant | KLD x1e3 (SE) | KLD / anchor (SE) | top-1 (SE) | top-1 vs anchor (SE) | model MB | "
          "size / anchor | export s |")
    print("|---|---|---|---|---|---|---|---|", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        export(args.checkpoint, root / "fp32", ExportOptions(precision="fp32"))
        reference = log_probs(root / "fp32", windows)
        if args.anchor == "builder":
            anchor_name = "onnxruntime-genai builder int4 (anchor)"
            seconds = builder_export(args.checkpoint, root / "anchor", root / "cache")
        else:
            anchor_name = "ours rtn-32, full emb, 4-bit head (anchor: the builder's layout)"
            result = export(args.checkpoint, root / "anchor",
                            ExportOptions(algo="rtn", block_size=32, embeddings="full", lm_head_bits=4))
            seconds = result.seconds
        anchor = per_window(reference, log_probs(root / "anchor", windows))
        anchor_bytes = weights_bytes(root / "anchor")
        todo: list[tuple[str, dict[str, Any] | None]] = [(anchor_name, None), *variants.items()]
        for i, (name, kwargs) in enumerate(todo):
            folder = root / "anchor" if kwargs is None else root / f"v{i}"
            options: dict[str, Any] = {}
            if kwargs is not None:
                opts = ExportOptions(precision="int4", **kwargs)
                result = export(args.checkpoint, folder, opts)
                seconds = result.seconds
                kl, top1 = per_window(reference, log_probs(folder, windows))
                options = opts.to_dict()
            else:
                kl, top1 = anchor
            ratio = kl / anchor[0].mean()
            rows.append({"variant": name, "options": options, "kld": kl.mean(), "kld_se": se(kl),
                         "top1": top1.mean(), "top1_se": se(top1), "kld_ratio": ratio.mean(),
                         "kld_ratio_se": se(ratio - anchor[0] / anchor[0].mean()),
                         "top1_gain": (top1 - anchor[1]).mean(), "top1_gain_se": se(top1 - anchor[1]),
                         "bytes": weights_bytes(folder), "size_ratio": weights_bytes(folder) / anchor_bytes,
                         "seconds": seconds})
            r = rows[-1]
            print(f"| {r['variant']} | {r['kld'] * 1e3:.2f} ({r['kld_se'] * 1e3:.2f}) | {r['kld_ratio']:.3f} "
                  f"({r['kld_ratio_se']:.3f}) | {r['top1']:.4f} ({r['top1_se']:.4f}) | "
                  f"{r['top1_gain'] * 100:+.2f} pt ({r['top1_gain_se'] * 100:.2f}) | {r['bytes'] / 1e6:.3f} | "
                  f"{r['size_ratio']:.3f} | {r['seconds']:.1f} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2, default=float))


if __name__ == "__main__":
    main()
