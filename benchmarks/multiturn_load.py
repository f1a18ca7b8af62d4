"""Multi-turn chat and shared-prefix bursts against a running server: what prefix reuse is worth.

Two workloads, on token ids so that every server sees the same tokens:

- `multiturn`: U users talk at once for T turns. A shared system prompt of S tokens starts every
  conversation; each turn adds Q user tokens and asks for exactly R reply tokens (EOS ignored); the
  next turn's prompt is the whole conversation so far, the reply's own ids included (phi-onnx returns
  them with the `return_token_ids` extension, llama-server with `return_tokens`).
- `burst`: N requests sharing one P-token prefix, each with its own Q-token question, C at a time.

llama-server's stream never sends the id of a token that ends inside a UTF-8 character (it holds the text
back and sends only the completing token's id), so its replies would come back short. `--tokenizer
tokenizer.json` bans such tokens (every id whose text alone is not whole UTF-8) on both servers alike with
logit_bias: which tokens the replies hold changes, not how many, nor the work.

Per workload: wall time, aggregate output tokens/s, TTFT p50 per turn, ITL p50/p99, and the prompt
tokens the server says it served from its cache. `--api phi-onnx` talks /v1/completions; `--api llama`
talks llama-server's /completion (cache_prompt on, its default).

    python benchmarks/multiturn_load.py --url http://127.0.0.1:8000 --api phi-onnx --vocab 32064 multiturn \\
        --users 4 --turns 4 --system-tokens 400 --turn-tokens 60 --reply-tokens 64
    python benchmarks/multiturn_load.py --url ... --api llama --vocab 32064 burst --requests 16 --concurrency 8
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import time
from typing import Any

import httpx
import numpy as np

BANNED: list[int] = []  # ids whose text alone is not whole UTF-8 (--tokenizer), kept out of every reply


def partial_utf8_ids(tokenizer_json: str) -> list[int]:
    """Token ids whose decoded text alone is not whole UTF-8 (a replacement character)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(tokenizer_json)
    return [i for i in range(tokenizer.get_vocab_size()) if "\ufffd" in tokenizer.decode([i])]


def fresh_connections(clients: int) -> httpx.Limits:
    """A new connection per request, for both servers: llama-server closed a kept-alive connection that the
    next turn reused (httpx.ReadError); on loopback a connection costs well under a millisecond."""
    return httpx.Limits(max_connections=clients + 4, max_keepalive_connections=0)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), NaN when empty."""
    return float(np.percentile(values, q)) if values else float("nan")


async def complete(client: httpx.AsyncClient, api: str, prompt: list[int], new_tokens: int) -> dict[str, Any]:
    """Stream one completion of exactly `new_tokens` greedy tokens; its timings, ids and cached prompt tokens."""
    if api == "phi-onnx":
        path, body = "/v1/completions", {
            "prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}, "return_token_ids": True}
        if BANNED:
            body["logit_bias"] = {str(i): -100 for i in BANNED}
    else:
        path, body = "/completion", {
            "prompt": prompt, "n_predict": new_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "cache_prompt": True, "return_tokens": True}
        if BANNED:
            body["logit_bias"] = [[i, False] for i in BANNED]
    start = time.perf_counter()
    arrivals: list[float] = []
    ids: list[int] = []
    cached = None
    async with client.stream("POST", path, json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            now = time.perf_counter()
            chunk = json.loads(line[len("data: "):])
            if api == "phi-onnx":
                usage = chunk.get("usage")
                if usage:
                    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
                for choice in chunk.get("choices", []):
                    new = choice.get("token_ids") or []
                    if new:
                        arrivals.extend([now] * len(new))
                        ids.extend(new)
            else:
                new = chunk.get("tokens") or []
                if new:
                    arrivals.extend([now] * len(new))
                    ids.extend(new)
                if chunk.get("stop"):
                    cached = (chunk.get("timings") or {}).get("cache_n")
    return {"start": start, "arrivals": arrivals, "ids": ids, "cached": cached, "prompt_tokens": len(prompt)}


def summary(results: list[dict[str, Any]], wall: float, turns: int = 1) -> dict[str, Any]:
    """Aggregate figures of one workload."""
    tokens = sum(len(r["ids"]) for r in results)
    began = min((r["start"] for r in results), default=0.0)
    itl = [b - a for r in results for a, b in zip(r["arrivals"], r["arrivals"][1:], strict=False) if b > a]
    ttft = {t: [r["arrivals"][0] - r["start"] for r in results if r.get("turn", 0) == t and r["arrivals"]]
            for t in range(turns)}
    cached = [r["cached"] for r in results if r["cached"] is not None]
    prompt = sum(r["prompt_tokens"] for r in results)
    return {"requests": len(results), "seconds": round(wall, 2), "output_tokens": tokens,
            "output_tok_s": round(tokens / wall, 1),
            "ttft_p50_s_by_turn": [round(percentile(v, 50), 2) for v in ttft.values()],
            "itl_p50_ms": round(1000 * percentile(itl, 50), 1), "itl_p99_ms": round(1000 * percentile(itl, 99), 1),
            "prompt_tokens": prompt, "prompt_tokens_cached": sum(cached) if cached else None,
            "prompt_tokens_computed": prompt - sum(cached) if len(cached) == len(results) else None,
            # per request, in start order (written to --json only): when it started, its TTFT, its cached tokens
            "detail": [{"start_s": round(r["start"] - began, 3), "turn": r.get("turn", 0),
                        "ttft_s": round(r["arrivals"][0] - r["start"], 3) if r["arrivals"] else None,
                        "cached": r["cached"], **widest_gap(r["arrivals"], began)}
                       for r in sorted(results, key=lambda r: r["start"])]}


def widest_gap(arrivals: list[float], began: float) -> dict[str, float]:
    """A request's longest inter-token gap, and when it began (seconds from the workload's start)."""
    gaps = [(b - a, a) for a, b in itertools.pairwise(arrivals)]
    gap, at = max(gaps, default=(0.0, began))
    return {"itl_max_s": round(gap, 3), "itl_max_at_s": round(at - began, 3)}


async def multiturn(url: str, api: str, vocab: int, users: int, turns: int, system: int, turn: int, reply: int,
                    seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    shared = rng.integers(10, vocab - 10, size=system).tolist()
    results: list[dict[str, Any]] = []
    async with httpx.AsyncClient(base_url=url, timeout=900, limits=fresh_connections(users)) as client:
        async def user(u: int) -> None:
            history = list(shared)
            for t in range(turns):
                history += rng.integers(10, vocab - 10, size=turn).tolist()
                result = await complete(client, api, history, reply)
                if len(result["ids"]) != reply:
                    raise RuntimeError(f"user {u} turn {t}: {len(result['ids'])} ids back, not {reply}")
                results.append({**result, "turn": t})
                history += result["ids"]

        began = time.perf_counter()
        await asyncio.gather(*(user(u) for u in range(users)))
        wall = time.perf_counter() - began
    return summary(results, wall, turns)


async def burst(url: str, api: str, vocab: int, requests: int, concurrency: int, prefix: int, question: int,
                reply: int, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    shared = rng.integers(10, vocab - 10, size=prefix).tolist()
    prompts = [shared + rng.integers(10, vocab - 10, size=question).tolist() for _ in range(requests)]
    gate = asyncio.Semaphore(concurrency)
    results: list[dict[str, Any]] = []
    async with httpx.AsyncClient(base_url=url, timeout=900,
                                 limits=fresh_connections(concurrency)) as client:
        async def one(prompt: list[int]) -> None:
            async with gate:
                results.append(await complete(client, api, prompt, reply))

        began = time.perf_counter()
        await asyncio.gather(*(one(p) for p in prompts))
        wall = time.perf_counter() - began
    return summary(results, wall)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True)
    parser.add_argument("--api", choices=["phi-onnx", "llama"], required=True)
    parser.add_argument("--vocab", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer.json: ban ids that end inside a UTF-8 character (see above)")
    sub = parser.add_subparsers(dest="workload", required=True)
    mt = sub.add_parser("multiturn")
    mt.add_argument("--users", type=int, default=4)
    mt.add_argument("--turns", type=int, default=4)
    mt.add_argument("--system-tokens", type=int, default=400)
    mt.add_argument("--turn-tokens", type=int, default=60)
    mt.add_argument("--reply-tokens", type=int, default=64)
    b = sub.add_parser("burst")
    b.add_argument("--requests", type=int, default=16)
    b.add_argument("--concurrency", type=int, default=8)
    b.add_argument("--prefix-tokens", type=int, default=600)
    b.add_argument("--question-tokens", type=int, default=30)
    b.add_argument("--reply-tokens", type=int, default=32)
    args = parser.parse_args()
    if args.tokenizer:
        BANNED.extend(partial_utf8_ids(args.tokenizer))
    # a warm-up request on ids no workload sends
    asyncio.run(burst(args.url, args.api, args.vocab, 1, 1, 16, 4, 4, seed=10_000 + args.seed))
    if args.workload == "multiturn":
        row = asyncio.run(multiturn(args.url, args.api, args.vocab, args.users, args.turns, args.system_tokens,
                                    args.turn_tokens, args.reply_tokens, args.seed))
    else:
        row = asyncio.run(burst(args.url, args.api, args.vocab, args.requests, args.concurrency, args.prefix_tokens,
                                args.question_tokens, args.reply_tokens, args.seed + 1))  # not multiturn's ids
    row = {"api": args.api, "workload": args.workload, **row}
    print(json.dumps({k: v for k, v in row.items() if k != "detail"}), flush=True)
    if args.json:
        with open(args.json, "w") as out:
            json.dump(row, out, indent=2)


if __name__ == "__main__":
    main()
