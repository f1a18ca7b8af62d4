"""What serving a mix of switchable LoRA adapters costs: `phi-onnx serve` aggregate output tok/s at C concurrent
streaming clients when every request asks for the base, vs. when the clients cycle over 3 adapters (and over
the 3 adapters and the base). Issue 22's goal: the mixed batch at least 85 % of the all-base throughput.

Builds (or reuses, in --work) an int4 export of CHECKPOINT with --adapters synthetic rank-R PEFT LoRA adapters
on every projection (benchmarks/lora_cost.py's `synthetic_adapter`, one seed each) and starts `phi-onnx serve`
on a free 127.0.0.1 port (the base served as `base`, the adapters as `a1`, `a2`, ...; its log in
--work/serve.log). It checks that each adapter changes the output, then runs C clients x N streaming
/v1/completions requests (random prompts, greedy, EOS ignored) per load with benchmarks/serve_load.py's
client. The loads alternate round by round (the machine is noisy), each round in a rotated order on fresh
prompts (no prefix reuse across loads). Reports medians over the rounds: aggregate output tok/s, TTFT p50,
ITL p50 / p99, and the median of each round's ratio to that round's all-base tok/s.

    python benchmarks/make_random_checkpoint.py /tmp/phi-bench/phi3-mid --preset phi3-mid   # once
    python benchmarks/lora_serve_mix.py /tmp/phi-bench/phi3-mid --tokenizer-from /tmp/phi-bench/phi3-mid-int4 \\
        --work /tmp/lora-mix --clients 8 --requests-per-client 4 --rounds 3 --json lora_mix.json

On the bundled tiny model (a check of the script, not a figure to quote):

    python benchmarks/lora_serve_mix.py tiny-phi3 --work /tmp/lora-mix-tiny --requests-per-client 2 \\
        --prompt-tokens 32 --new-tokens 32 --rounds 2 --threads 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmarks, run as a script

from lora_cost import synthetic_adapter
from serve_load import level, start_server, wait_healthy

BASE = "base"


def checkpoint_folder(name: str) -> Path:
    """A checkpoint folder, or the bundled tiny model for `tiny-phi3`."""
    if name == "tiny-phi3":
        from phi_onnx.tiny import TINY_PHI3_DIR

        return TINY_PHI3_DIR
    return Path(name)


def build_export(checkpoint: Path, work: Path, rank: int, count: int, tokenizer_from: Path | None) -> Path:
    """The int4 export of `checkpoint` with `count` switchable rank-`rank` adapters a1..aN (reused when there)."""
    from phi_onnx.export import ExportOptions, export

    out = work / f"int4-lora-{count}x-r{rank}"
    if out.exists():  # export moves a finished folder into place: one that exists is complete
        return out
    adapters = []
    for i in range(1, count + 1):
        folder = work / f"adapter-r{rank}-{i}"
        if not folder.exists():
            synthetic_adapter(checkpoint, folder, rank, seed=i)
        adapters.append((f"a{i}", str(folder)))
    export(checkpoint, out, ExportOptions(precision="int4", adapters=tuple(adapters)))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if tokenizer_from and (tokenizer_from / name).is_file() and not (out / name).exists():
            shutil.copy2(tokenizer_from / name, out / name)
    return out


def check_adapters_apply(url: str, names: list[str]) -> None:
    """Exit unless every adapter is served and changes the output of a prompt (else the mixed loads would
    time the base under other names). Its greedy tokens or their log-probabilities: a weak random adapter
    may keep the tokens."""
    def output(model: str) -> tuple[list[int], list[float]]:
        body = {"model": model, "prompt": list(range(20, 36)), "max_tokens": 8, "temperature": 0,
                "ignore_eos": True, "return_token_ids": True, "logprobs": 1}
        reply = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
        if reply.status_code != 200:
            sys.exit(f"model={model}: {reply.status_code} {reply.text}")
        choice = reply.json()["choices"][0]
        return choice["token_ids"], choice["logprobs"]["token_logprobs"]

    base = output(BASE)
    same = [name for name in names if output(name) == base]
    if same:
        sys.exit(f"adapters {', '.join(same)} give the base's output: they are not applied")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a checkpoint folder, or tiny-phi3 (the bundled tiny model)")
    parser.add_argument("--work", type=Path, required=True, help="folder for the adapters and the export (reused)")
    parser.add_argument("--tokenizer-from", type=Path, help="copy tokenizer files from here (random checkpoints)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--adapters", type=int, default=3, help="adapters in the mix")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--max-batch", type=int, default=None, help="KV slots (default: --clients)")
    parser.add_argument("--max-adapters", type=int, default=None, help="passed to serve (default: all loaded)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args()
    if min(args.rank, args.adapters, args.clients, args.requests_per_client, args.rounds) < 1:
        parser.error("--rank, --adapters, --clients, --requests-per-client and --rounds must be at least 1")

    from phi_onnx.runtime.folder import read_folder

    args.work.mkdir(parents=True, exist_ok=True)
    folder = build_export(checkpoint_folder(args.checkpoint), args.work, args.rank, args.adapters,
                          args.tokenizer_from)
    vocab = read_folder(folder).vocab_size
    names = [f"a{i}" for i in range(1, args.adapters + 1)]
    loads: dict[str, list[str]] = {"all base": [BASE], f"{args.adapters} adapters": names,
                                   f"{args.adapters} adapters + base": [BASE, *names]}
    extra = ["--model-name", BASE, *(["--max-adapters", str(args.max_adapters)] if args.max_adapters else [])]
    server, url = start_server(str(folder), max_batch=args.max_batch or args.clients, max_queue=args.clients * 2,
                               max_context=args.prompt_tokens + args.new_tokens + 16, threads=args.threads,
                               extra=extra, log=args.work / "serve.log")
    rounds: list[dict[str, dict[str, Any]]] = []
    try:
        wait_healthy(url, server)
        check_adapters_apply(url, names)
        # Warm-up on prompts no load sends: every adapter read once, the first batches built.
        asyncio.run(level(url, len(names) + 1, 1, args.prompt_tokens, 8, vocab, {}, seed=10_000,
                          models=[BASE, *names]))
        order = list(loads)
        for round_ in range(args.rounds):
            rows = {}
            for k in range(len(order)):
                name = order[(round_ + k) % len(order)]  # rotated: no load always runs first
                seed = 1_000 * (round_ + 1) + order.index(name)
                rows[name] = asyncio.run(level(url, args.clients, args.requests_per_client, args.prompt_tokens,
                                               args.new_tokens, vocab, {}, seed=seed, models=loads[name]))
                print(f"round {round_ + 1} {name}: {json.dumps(rows[name])}", flush=True)
            rounds.append(rows)
    finally:
        server.terminate()
        server.wait(60)

    summary = {}
    for name in loads:
        tok_s = [r[name]["output_tok_s"] for r in rounds]
        summary[name] = {
            "output_tok_s": statistics.median(tok_s), "output_tok_s_rounds": tok_s,
            "ttft_p50_ms": statistics.median(r[name]["ttft_p50_ms"] for r in rounds),
            "itl_p50_ms": statistics.median(r[name]["itl_p50_ms"] for r in rounds),
            "itl_p99_ms": statistics.median(r[name]["itl_p99_ms"] for r in rounds),
            "ratio_to_all_base": round(statistics.median(r[name]["output_tok_s"] / r["all base"]["output_tok_s"]
                                                         for r in rounds), 3)}
    print(f"\n{args.checkpoint} int4 + {args.adapters} rank-{args.rank} adapters; {args.clients} clients x "
          f"{args.requests_per_client} requests, prompt {args.prompt_tokens}, {args.new_tokens} new tokens; "
          f"medians of {args.rounds} rounds\n")
    print("| load | output tok/s | TTFT p50 ms | ITL p50 / p99 ms | vs all base |")
    print("|---|---|---|---|---|")
    for name, s in summary.items():
        print(f"| {name} | {s['output_tok_s']:.1f} | {s['ttft_p50_ms']:.1f} | {s['itl_p50_ms']:.1f} / "
              f"{s['itl_p99_ms']:.1f} | {s['ratio_to_all_base'] * 100:.1f} % |")
    if args.json:
        args.json.write_text(json.dumps({
            "checkpoint": args.checkpoint, "export": str(folder), "rank": args.rank, "adapters": args.adapters,
            "clients": args.clients, "requests_per_client": args.requests_per_client,
            "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "threads": args.threads,
            "loads": loads, "summary": summary, "rounds": rounds}, indent=2))


if __name__ == "__main__":
    main()
