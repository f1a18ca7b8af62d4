"""Prompt and decode speed of export folders (int4 layouts of one model), paired in one process.

The same runner (phi-onnx's ort backend, as exported) takes turns on each folder, run after run, so every
round sees the same machine (a shared VM drifts by ±10–20 % from minute to minute); the medians of the
per-round ratios against the first folder are the figures to quote. One untimed warm-up round first.

    python benchmarks/int4_layout_speed.py out/old-default out/new-default --rounds 8
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def main() -> None:
    """Alternate the folders `--rounds` times; print medians and ratios against the first folder."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", type=Path, nargs="+")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from speed_runners import phi_onnx_runner

    runners = {str(f): phi_onnx_runner(f.resolve(), "ort", args.prompt_tokens, args.new_tokens) for f in args.folders}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in runners}
    for round_ in range(args.rounds + 1):
        for name, run in runners.items():
            figures = run()
            if round_:  # the first round warms up
                runs[name].append(dict(figures))
        if round_:
            print(f"round {round_}: " + ", ".join(f"{Path(n).name} {r[-1]['decode_tokens_per_second']:.2f}"
                                                 for n, r in runs.items()), file=sys.stderr, flush=True)
    first = next(iter(runs.values()))
    report: dict[str, object] = {"rounds": args.rounds, "prompt_tokens": args.prompt_tokens,
                                 "new_tokens": args.new_tokens, "runs": runs}
    print(f"{'folder':<48} {'prompt tok/s':>12} {'decode tok/s':>12} {'prompt ratio':>12} {'decode ratio':>12}")
    for name, rows in runs.items():
        medians = {key: statistics.median(r[f"{key}_tokens_per_second"] for r in rows) for key in ("prompt", "decode")}
        ratios = {key: statistics.median(b[f"{key}_tokens_per_second"] / a[f"{key}_tokens_per_second"]
                                         for a, b in zip(first, rows, strict=True)) for key in ("prompt", "decode")}
        report[name] = {"median": medians, "ratio_to_first": ratios}
        print(f"{name:<48} {medians['prompt']:>12.1f} {medians['decode']:>12.2f} {ratios['prompt']:>12.3f} "
              f"{ratios['decode']:>12.3f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
