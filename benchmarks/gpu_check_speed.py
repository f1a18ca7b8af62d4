"""Speed of one export for gpu_check.sh: phi-onnx's two backends against raw onnxruntime-genai.

    python benchmarks/gpu_check_speed.py FOLDER --device cuda [--prompt-tokens 128] [--new-tokens 128]
        [--batch 8] [--runs 3]

Prints one JSON object: for each runner the median prompt and decode tokens/s of RUNS timed runs
(after one warm-up; runners alternate, as in paired_speed.py), then batched decode (BATCH equal prompts
at once) for phi-onnx's ort backend and for onnxruntime-genai. Single runs use speed_runners.py.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed_runners import Figures, figures, genai_runner, phi_onnx_runner


def genai_batch_runner(folder: Path, batch: int, prompt_tokens: int, new_tokens: int) -> Callable[[], Figures]:
    """Raw onnxruntime-genai decoding `batch` equal prompts together."""
    run_one = genai_runner(folder, prompt_tokens, new_tokens, batch=batch)
    return lambda: _batched(run_one(), batch)


def ort_batch_runner(folder: Path, batch: int, prompt_tokens: int, new_tokens: int,
                     device: str) -> Callable[[], Figures]:
    """phi-onnx's ort backend generating for `batch` equal prompts in one batched call."""
    import phi_onnx

    model = phi_onnx.load(folder, backend="ort", device=device)
    prompts = [list(range(100, 100 + prompt_tokens))] * batch

    def run() -> Figures:
        model.engine.forget()
        results = model.generate(prompts, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        first, seconds = max(r.first_token_seconds for r in results), max(r.seconds for r in results)
        return _batched(figures(prompt_tokens, new_tokens, first, seconds), batch)

    return run


def _batched(single: Figures, batch: int) -> Figures:
    """Speeds over every row: the batch's tokens per second."""
    return {**single, "prompt_tokens_per_second": single["prompt_tokens_per_second"] * batch,
            "decode_tokens_per_second": single["decode_tokens_per_second"] * batch}


def measure(runners: dict[str, Callable[[], Figures]], runs: int) -> dict[str, dict[str, float]]:
    """Warm each runner up once, then time them in turn; medians per runner."""
    for run in runners.values():
        run()
    timed: dict[str, list[Figures]] = {name: [] for name in runners}
    for _ in range(runs):
        for name, run in runners.items():
            timed[name].append(run())
    return {name: {key: round(statistics.median(f[key] for f in values), 4) for key in values[0]}
            for name, values in timed.items()}


def main(argv: list[str] | None = None) -> None:
    """Measure the export named on the command line and print the figures as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    p, n = args.prompt_tokens, args.new_tokens
    single = measure({"phi-onnx ort": phi_onnx_runner(args.folder, "ort", p, n, device=args.device),
                      "phi-onnx genai": phi_onnx_runner(args.folder, "genai", p, n, device=args.device),
                      "onnxruntime-genai": genai_runner(args.folder, p, n)}, args.runs)
    batched = measure({"phi-onnx ort": ort_batch_runner(args.folder, args.batch, p, n, args.device),
                       "onnxruntime-genai": genai_batch_runner(args.folder, args.batch, p, n)}, args.runs)
    print(json.dumps({"folder": str(args.folder), "device": args.device, "prompt_tokens": p, "new_tokens": n,
                      "runs": args.runs, "single": single, "batch": args.batch, "batched": batched}, indent=2))


if __name__ == "__main__":
    main()
