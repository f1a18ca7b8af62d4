"""Decode and prompt speed of an exported folder: phi-onnx's backends beside raw onnxruntime-genai.

Each runner runs in its own subprocess, runners alternating round by round (the machine is noisy):
one warm-up run, then `--runs` timed runs of a 128-token prompt and 128 greedy new tokens (EOS
suppressed), as in onnxruntime-genai's benchmark_e2e; medians are over every timed run. Raw
onnxruntime-genai runs on copies of the folder whose genai_config differs only in
`intra_op_num_threads` (absent = onnxruntime-genai's own default), so the thread knob is measured.

    python benchmarks/runtime_speed.py out/phi3-mid-cpu-int4 --rounds 4 --runs 3 --knobs --json speed.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from phi_onnx.runtime.bench import measure_bandwidth_gbps
from phi_onnx.runtime.folder import read_folder

#: Times one runner in a fresh process (one warm-up run, then the timed ones).
RUNNERS = str(Path(__file__).with_name("speed_runners.py"))


def genai_copy(folder: Path, threads: int | None, work: Path) -> Path:
    """A folder of links to `folder`'s files whose genai_config sets only `intra_op_num_threads`."""
    copy = work / f"threads-{threads if threads is not None else 'default'}"
    copy.mkdir()
    for item in folder.iterdir():
        if item.name != "genai_config.json":
            (copy / item.name).symlink_to(item.resolve())
    config = json.loads((folder / "genai_config.json").read_text())
    options = config["model"]["decoder"]["session_options"]
    options.pop("intra_op_num_threads", None)
    if threads is not None:
        options["intra_op_num_threads"] = threads
    (copy / "genai_config.json").write_text(json.dumps(config))
    return copy


def run(cmd: list[str]) -> list[dict[str, Any]]:
    """Timed runs in a fresh process, after one untimed warm-up run there (as the anchors were taken)."""
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return list(json.loads(out.strip().splitlines()[-1]))


def main() -> None:
    """Measure every runner `--rounds` times, alternating, and print medians."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--rounds", type=int, default=3, help="processes per runner, alternating runners")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per process, after one warm-up run")
    parser.add_argument("--only", action="append", default=[], metavar="TEXT",
                        help="run only the runners whose name contains TEXT (repeatable)")
    parser.add_argument("--knobs", action="store_true",
                        help="also run the ort backend with the LM head on every prompt position")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--compare", type=Path, action="append", default=[],
                        help="another export of the same weights (e.g. onnxruntime-genai's builder) to run "
                             "with raw onnxruntime-genai, 2 intra-op threads")
    args = parser.parse_args()
    folder = args.folder.resolve()
    weights = (folder / "model.onnx.data").stat().st_size
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        p, n, r = str(args.prompt_tokens), str(args.new_tokens), str(args.runs)
        runners: dict[str, list[str]] = {
            "phi-onnx ort backend": [sys.executable, RUNNERS, "phi-onnx", str(folder), p, n, r, "ort"],
            "phi-onnx genai backend (genai_config as exported)": [sys.executable, RUNNERS, "phi-onnx", str(folder),
                                                                  p, n, r, "genai"],
        }
        if args.knobs:
            runners["phi-onnx ort backend, LM head on every position"] = [
                sys.executable, RUNNERS, "phi-onnx", str(folder), p, n, r, "ort", "all-logits"]
        for threads in (None, 2):
            label = f"onnxruntime-genai raw, intra_op_num_threads={threads if threads is not None else 'unset'}"
            runners[label] = [sys.executable, RUNNERS, "genai", str(genai_copy(folder, threads, work)), p, n, r]
        for i, other in enumerate(args.compare):
            copy = work / f"compare-{i}"
            copy.mkdir()
            runners[f"onnxruntime-genai raw on {other.name}, intra_op_num_threads=2"] = [
                sys.executable, RUNNERS, "genai", str(genai_copy(other.resolve(), 2, copy)), p, n, r]
        if args.only:
            runners = {name: cmd for name, cmd in runners.items() if any(text in name for text in args.only)}
            if not runners:
                parser.error(f"no runner name contains any of {args.only}")
        results: dict[str, list[dict[str, Any]]] = {name: [] for name in runners}
        for round_ in range(args.rounds):
            for name, cmd in runners.items():
                runs = run(cmd)
                results[name].extend(runs)
                print(f"round {round_}: {name}: {runs}", file=sys.stderr)
    # Decode reads every weight once per token (the embedding table aside: one row is gathered).
    per_token = read_folder(folder).weight_bytes - read_folder(folder).embedding_bytes
    bandwidth = measure_bandwidth_gbps()
    ceiling = bandwidth * 1e9 / per_token
    summary = {}
    for name, runs in results.items():
        summary[name] = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        summary[name]["decode_fraction_of_ceiling"] = summary[name]["decode_tokens_per_second"] / ceiling
    report = {"folder": str(folder), "weights_bytes": weights, "rounds": args.rounds, "runs_per_round": args.runs,
              "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "bytes_read_per_token": per_token,
              "memory_bandwidth_gbps": bandwidth, "decode_ceiling_tokens_per_second": ceiling,
              "median": summary, "runs": results}
    print(f"bandwidth ceiling: {per_token / 1e6:.0f} MB per token at {bandwidth:.1f} GB/s (numpy copy/read probe) "
          f"= {ceiling:.1f} tok/s")
    print(f"{'runner':<62} {'prompt tok/s':>12} {'TTFT ms':>8} {'decode tok/s':>12} {'of ceiling':>10}")
    for name, row in summary.items():
        print(f"{name:<62} {row['prompt_tokens_per_second']:>12.1f} {row['first_token_seconds'] * 1000:>8.0f} "
              f"{row['decode_tokens_per_second']:>12.1f} {row['decode_fraction_of_ceiling']:>10.0%}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
