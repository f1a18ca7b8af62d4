"""phi-onnx's ort backend against tuned onnxruntime-genai, paired in one process.

On a shared VM the speed of the machine drifts by ±10–20 % from minute to minute, more than the
difference being measured. Here both runners live in one process and take turns, run after run, so
each pair sees the same machine; the median of the per-pair ratios is the figure to quote.
onnxruntime-genai runs with `intra_op_num_threads` 2 (its tuned setting on a 2-core machine) on a
linked copy of the folder; phi-onnx runs the folder as exported. One untimed warm-up pair first.

    python benchmarks/paired_speed.py out/phi3-mid-cpu-int4 --pairs 12 --json paired.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np


def main() -> None:
    """Alternate the two runners `--pairs` times and print medians and the paired ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--pairs", type=int, default=12)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from runtime_speed import genai_copy
    from speed_runners import genai_runner, phi_onnx_runner

    folder = args.folder.resolve()
    with tempfile.TemporaryDirectory() as tmp:
        runners = {
            "onnxruntime-genai, intra_op_num_threads=2": genai_runner(genai_copy(folder, 2, Path(tmp)),
                                                                       args.prompt_tokens, args.new_tokens),
            "phi-onnx ort backend": phi_onnx_runner(folder, "ort", args.prompt_tokens, args.new_tokens),
        }
        results: dict[str, list[dict[str, float]]] = {name: [] for name in runners}
        for pair in range(args.pairs + 1):
            for name, run in runners.items():
                figures = run()
                if pair:  # the first pair warms up
                    results[name].append(figures)
            if pair:
                print(f"pair {pair}: " + ", ".join(
                    f"{n}: {r[-1]['prompt_tokens_per_second']:.1f} / {r[-1]['decode_tokens_per_second']:.2f}"
                    for n, r in results.items()), file=sys.stderr)
    genai, ours = results.values()
    report: dict[str, Any] = {"folder": str(folder), "pairs": args.pairs, "prompt_tokens": args.prompt_tokens,
                              "new_tokens": args.new_tokens, "median": {}, "runs": results}
    for name, runs in results.items():
        report["median"][name] = {key: statistics.median(r[key] for r in runs)
                                  for key in ("prompt_tokens_per_second", "decode_tokens_per_second")}
    for key in ("prompt", "decode"):
        rate = f"{key}_tokens_per_second"
        ratios = sorted(b[rate] / a[rate] for a, b in zip(genai, ours, strict=True))
        report[f"{key}_ratio_ort_over_genai"] = {"median": statistics.median(ratios),
                                                 "quartiles": [float(np.percentile(ratios, 25)),
                                                               float(np.percentile(ratios, 75))]}
    print(f"{'runner':<44} {'prompt tok/s':>12} {'decode tok/s':>12}")
    for name, row in report["median"].items():
        print(f"{name:<44} {row['prompt_tokens_per_second']:>12.1f} {row['decode_tokens_per_second']:>12.2f}")
    for key in ("prompt", "decode"):
        ratio = report[f"{key}_ratio_ort_over_genai"]
        print(f"{key} ratio ort / genai, median of {args.pairs} pairs: {ratio['median']:.3f} "
              f"(quartiles {ratio['quartiles'][0]:.3f}–{ratio['quartiles'][1]:.3f})")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
