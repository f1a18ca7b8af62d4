"""Each round's ratios and their medians, from benchmarks/prefix_reuse_anchor.sh's results.

The anchor script runs every workload on llama-server and phi-onnx back to back, round after round. A
ratio is taken within a round (the two runs minutes apart) and the rounds' median is the figure to quote;
the spread between rounds shows how much the machine moved.

    python benchmarks/prefix_reuse_summary.py /tmp/llama-server-anchor/prefix-results/20261207-085000
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path
from typing import Any

NAME = re.compile(r"^(?P<workload>multiturn|burst)-(?P<kind>llama|phi-onnx)(?:-(?P<users>\d+))?-r(?P<round>\d+)$")


def load(folder: Path) -> dict[tuple[str, int], dict[str, dict[str, Any]]]:
    """{(workload label, round): {kind: result}} for every result file the anchor script wrote."""
    runs: dict[tuple[str, int], dict[str, dict[str, Any]]] = {}
    for path in sorted(folder.glob("*.json")):
        match = NAME.match(path.stem)
        if match is None:
            continue
        label = match["workload"] if match["users"] is None else f"U={match['users']}"
        runs.setdefault((label, int(match["round"])), {})[match["kind"]] = json.loads(path.read_text())
    return runs


def row(label: str, llama: dict[str, Any], phi: dict[str, Any]) -> dict[str, float]:
    """One round of one workload: the goals' quantities."""
    def later(result: dict[str, Any]) -> float:  # turns 2+ (all turns when there was one)
        turns = result["ttft_p50_s_by_turn"]
        return statistics.median(turns[1:] if label != "burst" and len(turns) > 1 else turns)

    def spread(result: dict[str, Any]) -> float:
        return result["itl_p99_ms"] / result["itl_p50_ms"] if result["itl_p50_ms"] else float("nan")

    return {"llama tok/s": llama["output_tok_s"], "phi tok/s": phi["output_tok_s"],
            "tok/s ratio": phi["output_tok_s"] / llama["output_tok_s"],
            "TTFT llama s": later(llama), "TTFT phi s": later(phi), "TTFT ratio": later(phi) / later(llama),
            "phi ITL p99/p50": spread(phi), "llama ITL p99/p50": spread(llama)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="one anchor run's folder (WORK/prefix-results/YYYYmmdd-HHMMSS)")
    args = parser.parse_args()
    runs = load(args.results)
    if not runs:
        raise SystemExit(f"no round results (NAME-rN.json) in {args.results}")
    columns = ["llama tok/s", "phi tok/s", "tok/s ratio", "TTFT llama s", "TTFT phi s", "TTFT ratio",
               "phi ITL p99/p50", "llama ITL p99/p50"]
    print("TTFT: median of turns 2+ p50 (multi-turn), p50 (burst).")
    print("| workload | round | " + " | ".join(columns) + " |")
    print("|---|---|" + "---|" * len(columns))
    for label in sorted({label for label, _ in runs}, key=lambda s: (s == "burst", len(s), s)):
        paired = [(number, pair) for (name, number), pair in sorted(runs.items())
                  if name == label and {"llama", "phi-onnx"} <= pair.keys()]
        rows = [row(label, pair["llama"], pair["phi-onnx"]) for _, pair in paired]
        for (number, _), values in zip(paired, rows, strict=True):
            print(f"| {label} | {number} | " + " | ".join(f"{values[c]:.2f}" for c in columns) + " |")
        if len(rows) > 1:
            medians = {c: statistics.median(r[c] for r in rows) for c in columns}
            print(f"| {label} | median | " + " | ".join(f"{medians[c]:.2f}" for c in columns) + " |")


if __name__ == "__main__":
    main()
