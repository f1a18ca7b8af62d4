"""Single-stream speed of two checkouts of phi-onnx's ort backend, paired: before/after a runtime change.

Each round runs every checkout in its own process (PYTHONPATH=that checkout), in turn, on the same
export: one warm-up, then `--runs` timed generations of a `--prompt-tokens` prompt and `--new-tokens`
greedy tokens from an empty cache. Prints per-checkout medians and the median of the per-round ratios
(the second checkout over the first), which the machine's drift does not blur.

    python benchmarks/core_speed.py /tmp/phi-bench/phi3-mid-int4 OLD_CHECKOUT NEW_CHECKOUT --rounds 6
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = """
import json, sys, statistics
sys.path.insert(0, sys.argv[1])
from speed_runners import phi_onnx_runner
from pathlib import Path
run = phi_onnx_runner(Path(sys.argv[2]), "ort", int(sys.argv[3]), int(sys.argv[4]))
run()
figures = [run() for _ in range(int(sys.argv[5]))]
print(json.dumps({k: statistics.median(f[k] for f in figures)
                  for k in ("prompt_tokens_per_second", "decode_tokens_per_second")}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("checkouts", nargs=2)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    args = parser.parse_args()
    here = os.path.dirname(os.path.abspath(__file__))
    results: dict[str, list[dict[str, float]]] = {c: [] for c in args.checkouts}
    for r in range(args.rounds):
        for checkout in (args.checkouts if r % 2 == 0 else args.checkouts[::-1]):
            env = {**os.environ, "PYTHONPATH": os.path.abspath(checkout)}
            out = subprocess.run([sys.executable, "-c", CHILD, here, args.folder, str(args.prompt_tokens),
                                  str(args.new_tokens), str(args.runs)], env=env, capture_output=True, text=True,
                                 check=True)
            results[checkout].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1} {checkout}: {results[checkout][-1]}", file=sys.stderr, flush=True)
    old, new = args.checkouts
    print("| checkout | prompt tok/s | decode tok/s |\n|---|---|---|")
    for checkout in args.checkouts:
        rows = results[checkout]
        print(f"| {checkout} | {statistics.median(f['prompt_tokens_per_second'] for f in rows):.1f} | "
              f"{statistics.median(f['decode_tokens_per_second'] for f in rows):.2f} |")
    for key in ("prompt_tokens_per_second", "decode_tokens_per_second"):
        ratios = [b[key] / a[key] for a, b in zip(results[old], results[new], strict=True)]
        print(f"{key}: new/old median {statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f})")


if __name__ == "__main__":
    main()
