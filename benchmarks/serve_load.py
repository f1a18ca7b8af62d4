"""Load test of `phi-onnx serve`: N concurrent streaming clients, vLLM-style figures.

Starts `phi-onnx serve FOLDER` in a subprocess on a free 127.0.0.1 port (or uses --url), then for
each concurrency N runs N clients at once, each sending `--requests-per-client` streaming
/v1/completions requests one after another: a `--prompt-tokens` prompt of random token ids and
`--new-tokens` greedy tokens with EOS ignored (so every reply has the same length). Reports per N:
aggregate output tokens/s, requests/s, time to first token p50/p99, inter-token latency p50/p99 (and in the
JSON its largest gap and the time to the second token p50).
`--static` adds, per N, the ort backend's static batch (`Model.generate` of N prompts in this process,
run right after that level while the server idles) for comparison.

    python benchmarks/serve_load.py out/phi3-mid-cpu-int4 --clients 1,2,4,8,16 --json serve.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), NaN when empty."""
    return float(np.percentile(values, q)) if values else float("nan")


async def one_request(client: httpx.AsyncClient, prompt: list[int], new_tokens: int,
                      model: str | None = None) -> dict[str, Any]:
    """Stream one completion (for `model` when given: a served name or LoRA adapter); returns its start, chunk
    arrival times and token count.

    The token count is the usage's completion_tokens: llama-server holds back a token that ends in an
    incomplete UTF-8 character and sends it with the next one, so chunks can be fewer than tokens.
    """
    body = {"prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True},
            "logprobs": 0}  # logprobs: one chunk per token, even when a token adds no visible text
    if model is not None:
        body["model"] = model
    start = time.perf_counter()
    arrivals: list[float] = []
    tokens = None
    async with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            now = time.perf_counter()
            chunk = json.loads(line[len("data: "):])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk["choices"] and chunk["choices"][0]["finish_reason"] is None:
                arrivals.append(now)
    return {"start": start, "arrivals": arrivals, "tokens": len(arrivals) if tokens is None else tokens}


async def level(url: str, clients: int, per_client: int, prompt_tokens: int, new_tokens: int, vocab: int,
                headers: dict[str, str], seed: int | None = None,
                models: Sequence[str | None] | None = None) -> dict[str, Any]:
    """Run `clients` concurrent clients; the figures of that level (prompts seeded by `clients`).

    With `models`, client w's i-th request asks for models[(w + i) % len(models)], so at any moment the
    clients are spread evenly over them (e.g. a base model and its LoRA adapters); without, no `model` is sent.
    """
    rng = np.random.default_rng(clients if seed is None else seed)
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits, headers=headers) as client:
        async def worker(w: int) -> list[dict[str, Any]]:
            out = []
            for i in range(per_client):
                prompt = rng.integers(10, vocab - 10, size=prompt_tokens).tolist()
                model = models[(w + i) % len(models)] if models else None
                out.append(await one_request(client, prompt, new_tokens, model))
            return out

        began = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(worker(w) for w in range(clients))) for r in rs]
        wall = time.perf_counter() - began
    tokens = sum(r["tokens"] for r in results)
    ttft = [r["arrivals"][0] - r["start"] for r in results if r["arrivals"]]
    itl = [b - a for r in results for a, b in zip(r["arrivals"], r["arrivals"][1:], strict=False)]
    # The second token's wait shows what a p99 over many gaps hides: a server that sends first tokens early
    # and then prefills the other prompts leaves one long gap per stream.
    second = [r["arrivals"][1] - r["start"] for r in results if len(r["arrivals"]) > 1]
    return {"clients": clients, "requests": len(results), "output_tokens": tokens, "seconds": round(wall, 3),
            "output_tok_s": round(tokens / wall, 1), "req_s": round(len(results) / wall, 3),
            "ttft_p50_ms": round(1000 * percentile(ttft, 50), 1), "ttft_p99_ms": round(1000 * percentile(ttft, 99), 1),
            "itl_p50_ms": round(1000 * percentile(itl, 50), 1), "itl_p99_ms": round(1000 * percentile(itl, 99), 1),
            "itl_max_ms": round(1000 * max(itl, default=float("nan")), 1),
            "second_token_p50_ms": round(1000 * percentile(second, 50), 1)}


class StaticBatch:
    """The ort backend's static batch in this process: `Model.generate` of N prompts at once."""

    def __init__(self, folder: str, threads: int | None) -> None:
        import phi_onnx

        self.model = phi_onnx.load(folder, device="cpu", backend="ort", threads=threads)
        self.model.generate([1, 2, 3], max_new_tokens=4)  # warm-up

    def tokens_per_second(self, clients: int, prompt_tokens: int, new_tokens: int) -> float:
        """Generated tokens per second of one batch of `clients` prompts (its prefill included)."""
        rng = np.random.default_rng(0)
        prompts = [rng.integers(10, self.model.folder.vocab_size - 10, size=prompt_tokens).tolist()
                   for _ in range(clients)]
        began = time.perf_counter()
        results = self.model.generate(prompts, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        if clients == 1:
            results = [results] if not isinstance(results, list) else results
        return sum(r.new_tokens for r in results) / (time.perf_counter() - began)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_server(folder: str, *, max_batch: int, max_queue: int, max_context: int, threads: int | None = None,
                 extra: Sequence[str] = (), log: Path | None = None) -> tuple[subprocess.Popen[bytes], str]:
    """Start `phi-onnx serve FOLDER` on a free 127.0.0.1 port (more options in `extra`; its output to `log`
    when given); returns the process and its URL."""
    port = free_port()
    command = [sys.executable, "-m", "phi_onnx", "serve", folder, "--port", str(port),
               "--max-batch", str(max_batch), "--max-queue", str(max_queue), "--max-context", str(max_context),
               *(["--threads", str(threads)] if threads else []), *extra]
    out = log.open("wb") if log is not None else subprocess.DEVNULL
    try:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})
    finally:
        if log is not None:
            out.close()  # the child holds its own copy
    return server, f"http://127.0.0.1:{port}"


def wait_healthy(url: str, server: subprocess.Popen[bytes] | None, seconds: float = 300) -> None:
    """Wait until `url`/health answers 200; exit when `seconds` pass or `server` ends first."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline or (server is not None and server.poll() is not None):
            sys.exit("the server did not become healthy")
        time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder")
    parser.add_argument("--clients", default="1,2,4,8,16")
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--url", default=None, help="use this running server instead of starting one")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--static", action="store_true", help="also time the static batch per N")
    parser.add_argument("--json", default=None, help="write the figures here")
    parser.add_argument("--serve-options", default="",
                        help='more options for the phi-onnx serve it starts, e.g. "--cohort-tokens 0"')
    args = parser.parse_args()
    from phi_onnx.runtime.folder import read_folder

    vocab = read_folder(args.folder).vocab_size
    levels = [int(n) for n in args.clients.split(",")]
    server = None
    url = args.url
    if url is None:
        server, url = start_server(args.folder, max_batch=args.max_batch, max_queue=max(levels) * 2,
                                   max_context=args.prompt_tokens + args.new_tokens + 16, threads=args.threads,
                                   extra=shlex.split(args.serve_options))
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    rows = []
    static = StaticBatch(args.folder, args.threads) if args.static else None
    try:
        wait_healthy(url, server)
        # warm-up, on prompts no level sends (a server's prompt cache must not serve the first level)
        asyncio.run(level(url, 1, 1, args.prompt_tokens, 8, vocab, headers, seed=10_000))
        for clients in levels:
            row = asyncio.run(level(url, clients, args.requests_per_client, args.prompt_tokens, args.new_tokens,
                                    vocab, headers))
            if static is not None:
                row["static_batch_tok_s"] = round(static.tokens_per_second(clients, args.prompt_tokens,
                                                                           args.new_tokens), 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        if server is not None:
            server.terminate()
            server.wait(60)
    print("| clients | output tok/s | req/s | TTFT p50 / p99 ms | ITL p50 / p99 ms |"
          + (" static batch tok/s |" if args.static else ""))
    print("|---|---|---|---|---|" + ("---|" if args.static else ""))
    for r in rows:
        print(f"| {r['clients']} | {r['output_tok_s']} | {r['req_s']} | {r['ttft_p50_ms']} / {r['ttft_p99_ms']} | "
              f"{r['itl_p50_ms']} / {r['itl_p99_ms']} |" + (f" {r['static_batch_tok_s']} |" if args.static else ""))
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"folder": args.folder, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
                       "levels": rows}, out, indent=2)


if __name__ == "__main__":
    main()
