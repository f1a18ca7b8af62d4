"""`phi-onnx bench`: prompt processing, time to first token, decode speed, memory, and the bandwidth ceiling.

Decoding one token reads every weight once (the embedding table aside: one row is gathered), so on
a memory-bound machine decode speed cannot pass bandwidth / bytes per token. The bytes come from
model.onnx(.data) less the gathered-only tables; the bandwidth is measured with large numpy copies
and reads split over every CPU (a rough figure: shared machines vary by ±20 %) unless --bandwidth
gives it.
"""

from __future__ import annotations

import logging
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

import numpy as np

from phi_onnx.errors import OptionsError
from phi_onnx.runtime.errors import PromptTooLongError
from phi_onnx.runtime.model import Model

log = logging.getLogger(__name__)

#: Weights smaller than this may stay in the CPU caches between decode steps.
CACHE_BYTES = 64 * 1024 * 1024

FILLER = ("The history of computing is a story of layers: each new abstraction hides the one below it, "
          "and every so often someone has to look underneath to make things fast again. ")


def bench_prompt(model: Model, tokens: int) -> list[int]:
    """`tokens` ids of ordinary English text (the filler repeated)."""
    ids = model.encode(FILLER, add_special_tokens=False) or [model.folder.pad_token_id]
    return (ids * (tokens // len(ids) + 1))[:tokens]


def run_bench(model: Model, *, prompt_tokens: int = 128, new_tokens: int = 128, warmup: int = 1,
              repeat: int = 3, bandwidth_gbps: float | None = None) -> dict[str, Any]:
    """Time `repeat` greedy runs (after `warmup` untimed ones) and return medians and memory figures."""
    if prompt_tokens < 1 or new_tokens < 1 or repeat < 1 or warmup < 0:
        raise OptionsError("prompt tokens, new tokens and repetitions must be at least 1 (warm-up at least 0).",
                           hint="Use e.g. --prompt-tokens 128 --new-tokens 128 --repeat 3.")
    if prompt_tokens + new_tokens > model.context_length:
        raise PromptTooLongError(
            f"{prompt_tokens} prompt + {new_tokens} new tokens exceed the {model.context_length}-token context.",
            hint="Lower --prompt-tokens or --new-tokens.")
    if bandwidth_gbps is not None and not (isinstance(bandwidth_gbps, (int, float)) and 0 < bandwidth_gbps < math.inf):
        raise OptionsError(f"The memory bandwidth must be a positive number of GB/s, not {bandwidth_gbps!r}.",
                           hint="Use e.g. --bandwidth 50 (bandwidth_gbps=50), or leave it out to measure it.")
    prompt = bench_prompt(model, prompt_tokens)
    runs = []
    for i in range(warmup + repeat):
        with model.lock.held():  # another thread must not fill the cache between forget and generate
            model.engine.forget()  # the same prompt again must not be served from the cache
            result = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        if i < warmup:
            continue
        runs.append({
            "first_token_seconds": result.first_token_seconds,
            "prompt_tokens_per_second": prompt_tokens / result.first_token_seconds,
            "decode_tokens_per_second": result.decode_tokens_per_second,
            "wall_tokens_per_second": result.new_tokens / result.seconds,
            "seconds": result.seconds,
        })
        log.debug("run %d: %s", i - warmup, runs[-1])
    medians = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    peak_rss = peak_rss_bytes()  # before the bandwidth measurement's arrays raise it
    # Per token, every weight is read once, except the embedding table (one row is gathered).
    weight_bytes = model.folder.weight_bytes - model.folder.embedding_bytes
    source = "given"
    if bandwidth_gbps is None and model.device.kind == "cpu":
        bandwidth_gbps, source = measure_bandwidth_gbps(), f"measured: numpy copy/read on {os.cpu_count()} threads"
    ceiling = bandwidth_gbps * 1e9 / weight_bytes if bandwidth_gbps and weight_bytes else None
    return {
        "model": str(model.path), "provider": model.provider, "backend": model.backend,
        "device": model.device.name, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
        "warmup": warmup, "repeat": repeat,
        **{key: round(value, 4) for key, value in medians.items()},
        "peak_rss_bytes": peak_rss,
        "gpu_memory_bytes": gpu_memory_bytes() if model.device.kind == "cuda" else None,
        "weight_bytes": model.folder.weight_bytes, "bytes_read_per_token": weight_bytes,
        "memory_bandwidth_gbps": round(bandwidth_gbps, 2) if bandwidth_gbps else None,
        "bandwidth_source": source if bandwidth_gbps else None,
        "decode_ceiling_tokens_per_second": round(ceiling, 2) if ceiling else None,
        "decode_fraction_of_ceiling": round(medians["decode_tokens_per_second"] / ceiling, 4) if ceiling else None,
        "runs": [{key: round(value, 4) for key, value in run.items()} for run in runs],
    }


def measure_bandwidth_gbps(megabytes: int = 256, threads: int | None = None) -> float:
    """Memory bandwidth in GB/s: the best of a few passes over a large array, split over `threads`
    threads (default: every CPU) since one core alone cannot saturate memory. Two passes are timed,
    a copy (bytes read + written) and a read-only reduction, and the higher figure is kept: a ceiling
    should not be set lower than what a kernel can reach (numpy's copy alone came out 20 % below
    its read on a 2-core VM)."""
    from concurrent.futures import ThreadPoolExecutor

    threads = threads or os.cpu_count() or 1
    source = np.ones(megabytes * 1024 * 1024 // 4, dtype=np.float32)
    target = np.empty_like(source)
    parts = list(zip(np.array_split(source, threads), np.array_split(target, threads), strict=True))

    def best_seconds(work: Any) -> float:
        best = float("inf")
        for _ in range(4):
            started = time.perf_counter()
            list(pool.map(work, parts))
            best = min(best, time.perf_counter() - started)
        return best

    with ThreadPoolExecutor(threads) as pool:  # numpy releases the GIL in both
        copy = best_seconds(lambda pair: np.copyto(pair[1], pair[0]))
        read = best_seconds(lambda pair: pair[0].max())
    return max(2 * source.nbytes / copy, source.nbytes / read) / 1e9


def peak_rss_bytes() -> int:
    """The process's peak resident memory."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux


def gpu_memory_bytes() -> int | None:
    """GPU memory this process holds, from nvidia-smi (None when it cannot tell)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        pid, _, used = line.partition(",")
        if pid.strip() == str(os.getpid()):
            return int(float(used.strip()) * 1024 * 1024)
    return None


def format_bench(report: dict[str, Any]) -> str:
    """The human-readable table."""
    gb = 1024**3
    lines = [
        f"{report['model']}  ({report['provider']}, {report['backend']} backend, {report['device']})",
        f"prompt {report['prompt_tokens']} tokens, {report['new_tokens']} new, "
        f"median of {report['repeat']} after {report['warmup']} warm-up",
        f"  prompt processing  {report['prompt_tokens_per_second']:10.1f} tokens/s",
        f"  time to 1st token  {report['first_token_seconds'] * 1000:10.1f} ms",
        f"  decode             {report['decode_tokens_per_second']:10.1f} tokens/s",
        f"  wall clock         {report['wall_tokens_per_second']:10.1f} tokens/s",
        f"  peak RSS           {report['peak_rss_bytes'] / gb:10.2f} GiB",
    ]
    if report["gpu_memory_bytes"] is not None:
        lines.append(f"  GPU memory         {report['gpu_memory_bytes'] / gb:10.2f} GiB")
    if report["decode_ceiling_tokens_per_second"]:
        lines.append(
            f"  bandwidth ceiling  {report['decode_ceiling_tokens_per_second']:10.1f} tokens/s "
            f"({report['bytes_read_per_token'] / 1e6:.1f} MB of weights per token at "
            f"{report['memory_bandwidth_gbps']} GB/s, {report['bandwidth_source']}); "
            f"decode reaches {report['decode_fraction_of_ceiling']:.0%}")
        if report["decode_fraction_of_ceiling"] > 1:
            why = ("the weights fit in the CPU caches" if report["bytes_read_per_token"] < CACHE_BYTES
                   else "the copy test underestimates the bandwidth ONNX Runtime's kernels reach")
            lines.append(f"  (above the ceiling: {why})")
    return "\n".join(lines)
