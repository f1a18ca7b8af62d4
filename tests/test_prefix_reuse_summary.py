"""benchmarks/prefix_reuse_summary.py: ratios are taken within a round, the median across rounds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "prefix_reuse_summary.py"


def result(tok_s: float, ttft: list[float], itl: tuple[float, float]) -> dict[str, object]:
    return {"output_tok_s": tok_s, "ttft_p50_s_by_turn": ttft, "itl_p50_ms": itl[0], "itl_p99_ms": itl[1]}


def test_each_round_is_paired_and_the_median_taken(tmp_path):
    # Round 2 ran on a machine twice as fast: the within-round ratio stays 1.5, a cross-round one would not.
    runs = {"multiturn-llama-4-r1": result(10.0, [9.0, 4.0, 4.0, 4.0], (100, 150)),
            "multiturn-phi-onnx-4-r1": result(15.0, [5.0, 2.0, 1.0, 2.0], (100, 250)),
            "multiturn-llama-4-r2": result(20.0, [5.0, 2.0, 2.0, 2.0], (50, 75)),
            "multiturn-phi-onnx-4-r2": result(30.0, [3.0, 1.0, 1.0, 1.0], (50, 150)),
            "multiturn-llama-4-r3": result(12.0, [9.0, 4.0, 4.0, 4.0], (100, 150)),
            "multiturn-phi-onnx-4-r3": result(12.0, [5.0, 2.0, 2.0, 2.0], (100, 200)),
            "burst-llama-r1": result(5.0, [10.0], (200, 300)),
            "burst-phi-onnx-r1": result(10.0, [4.0], (200, 500)),
            "multiturn-phi-onnx-8-r1": result(1.0, [1.0, 1.0], (1, 1)),  # no llama run to pair with: left out
            "multiturn-llama-4": result(99.0, [1.0, 1.0], (1, 1))}  # not a round's file: ignored
    for name, data in runs.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(data))
    done = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = {tuple(cell.strip() for cell in line.strip("|").split("|")[:2]): line.strip("|").split("|")[2:]
             for line in done.stdout.splitlines() if line.startswith("| U=") or line.startswith("| burst")}
    cells = {key: [float(v) for v in values] for key, values in lines.items()}
    assert cells["U=4", "1"][2] == 1.5 and cells["U=4", "2"][2] == 1.5 and cells["U=4", "3"][2] == 1.0
    assert cells["U=4", "median"][2] == 1.5
    assert cells["U=4", "1"][5] == 0.5  # TTFT of turns 2+: median 2.0 vs 4.0
    assert cells["U=4", "median"][6] == 2.5  # phi's ITL p99/p50: 2.5, 3.0, 2.0
    assert cells["burst", "1"][2] == 2.0 and cells["burst", "1"][5] == 0.4
    assert ("burst", "median") not in cells and not any(key[0] == "U=8" for key in cells)


def test_a_folder_without_rounds_is_refused(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "no round results" in done.stderr
