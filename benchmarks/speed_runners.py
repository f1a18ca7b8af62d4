"""One greedy generation, timed the same way for every runner the speed benchmarks compare.

The prompt is token ids 100..100+P, the generation exactly N new tokens (EOS cannot stop it). Time to
first token covers prefill and the first token; decode speed is the other N - 1 tokens over the time
after it, as in onnxruntime-genai's benchmark_e2e.

`runtime_speed.py` runs each runner in its own process through this file's command line:

    python speed_runners.py genai FOLDER P N RUNS                 # raw onnxruntime-genai
    python speed_runners.py phi-onnx FOLDER P N RUNS BACKEND [all-logits]

which prints the JSON list of RUNS timed runs after one untimed warm-up run.
`paired_speed.py` imports the runners and alternates them in one process.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

Figures = dict[str, float]


def figures(prompt_tokens: int, new_tokens: int, first_token_seconds: float, seconds: float) -> Figures:
    """Prompt and decode speed from the time to the first token and the whole generation's time."""
    return {"first_token_seconds": first_token_seconds,
            "prompt_tokens_per_second": prompt_tokens / first_token_seconds,
            "decode_tokens_per_second": (new_tokens - 1) / (seconds - first_token_seconds)}


def genai_runner(folder: Path, prompt_tokens: int, new_tokens: int, *, batch: int = 1) -> Callable[[], Figures]:
    """Raw onnxruntime-genai on `folder`, with the genai_config found there; `batch` equal prompts decode
    together (the figures are then one row's: tokens/s of the batch are `batch` times them)."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    prompt = np.tile(np.arange(100, 100 + prompt_tokens, dtype=np.int32), (batch, 1))
    total = prompt_tokens + new_tokens
    search = {"batch_size": batch} if batch > 1 else {}

    def run() -> Figures:
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=total, min_length=total, **search)
        generator = og.Generator(model, params)
        started = time.perf_counter()
        generator.append_tokens(prompt)
        generator.generate_next_token()
        first = time.perf_counter() - started
        while not generator.is_done():
            generator.generate_next_token()
        return figures(prompt_tokens, new_tokens, first, time.perf_counter() - started)

    return run


def phi_onnx_runner(folder: Path, backend: str, prompt_tokens: int, new_tokens: int, *,
                    all_logits: bool = False, device: str = "cpu") -> Callable[[], Figures]:
    """phi-onnx's `backend` on `folder`; `all_logits` turns the ort backend's logits_to_keep off."""
    import phi_onnx

    if all_logits:  # the knob off: the LM head on every prompt position
        import phi_onnx.runtime.ort_backend as ort_backend

        ort_backend.add_logits_to_keep = lambda path: None
    model = phi_onnx.load(folder, backend=backend, device=device)
    prompt = list(range(100, 100 + prompt_tokens))

    def run() -> Figures:
        model.engine.forget()  # the same prompt again must not be served from the cache
        result = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        return figures(prompt_tokens, new_tokens, result.first_token_seconds, result.seconds)

    return run


def main() -> None:
    """Build one runner from the command line, warm it up once, print its timed runs as JSON."""
    kind, folder, prompt_tokens, new_tokens, runs = sys.argv[1], Path(sys.argv[2]), *map(int, sys.argv[3:6])
    if kind == "genai":
        run = genai_runner(folder, prompt_tokens, new_tokens)
    else:
        run = phi_onnx_runner(folder, sys.argv[6], prompt_tokens, new_tokens, all_logits="all-logits" in sys.argv[7:])
    run()
    print(json.dumps([run() for _ in range(runs)]))


if __name__ == "__main__":
    main()
