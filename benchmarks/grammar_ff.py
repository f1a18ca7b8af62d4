"""Does fast-forwarding a grammar's forced tokens pay? End-to-end chat (or generate) of a JSON-schema reply
at batch 1, with and without it (`phi_onnx.runtime.sequence.FAST_FORWARD`).

With fast-forward, the tokens the grammar forces after a sampled one (a schema's keys and punctuation)
are run through the model together with it, in one batch-1 run over the held prefix, instead of one
decode step each. Both modes give the same tokens (checked: `same_tokens`); the runs are alternated,
`--repeat` times each, and the median is reported.

Per mode: `tokens` generated, `runs` (session runs of the model: prefill chunks, decode steps, forced
runs; for the genai backend, `append_tokens` calls), `seconds` (median end to end, prompt included) and
`decode_seconds` (after the first token). `speedup` is off / on of `seconds`.

Usage:
    python benchmarks/grammar_ff.py FOLDER [--backend ort|genai] [--repeat 5] [--threads N] [--raw]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

#: The schema of benchmarks/grammar_cost.py: fixed keys, a nested object, an array.
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "email": {"type": "string", "maxLength": 40},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 4},
        "address": {"type": "object", "properties": {"street": {"type": "string", "maxLength": 40},
                                                     "city": {"type": "string", "maxLength": 30},
                                                     "zip": {"type": "string", "maxLength": 10}},
                    "required": ["street", "city", "zip"], "additionalProperties": False},
        "score": {"type": "integer", "minimum": 0, "maximum": 100},
    },
    "required": ["name", "age", "email", "tags", "address", "score"],
    "additionalProperties": False,
}
PROMPT = ("Invent a person and describe them as JSON with the fields name, age, email, tags, address "
          "(street, city, zip) and score.")


def counter(model: Any) -> list[int]:
    """A running count of the model's forward runs (patched onto this model's engine)."""
    count = [0]
    engine = model.engine
    if model.backend == "ort":
        core, run = engine.core, engine.core.run

        def counting_run(*args: Any, **kwargs: Any) -> Any:
            count[0] += 1
            return run(*args, **kwargs)

        core.run = counting_run
    else:
        extend = engine._extend

        def counting_extend(*args: Any, **kwargs: Any) -> Any:
            count[0] += 1
            return extend(*args, **kwargs)

        engine._extend = counting_extend
    return count


def once(model: Any, runs: list[int], on: bool, args: argparse.Namespace) -> dict[str, Any]:
    from phi_onnx.runtime import sequence

    sequence.FAST_FORWARD = on
    model.engine.forget()  # each pass computes its prompt: no cache from the previous one
    before = runs[0]
    options = {"json_schema": SCHEMA, "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
               "seed": args.seed}
    if args.raw:
        result = model.generate(args.prompt, **options)
    else:
        result = model.chat([{"role": "user", "content": args.prompt}], **options)
    return {"tokens": result.new_tokens, "runs": runs[0] - before, "seconds": result.seconds,
            "decode_seconds": result.seconds - result.first_token_seconds, "token_ids": result.token_ids,
            "text": result.text, "finish_reason": result.finish_reason}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="An export folder.")
    parser.add_argument("--backend", default="ort", choices=["ort", "genai"])
    parser.add_argument("--repeat", type=int, default=5, help="Passes per mode (alternated); the median is kept.")
    parser.add_argument("--threads", type=int, default=None, help="Intra-op threads (default: ORT's).")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--raw", action="store_true", help="Use generate on the raw prompt, not chat.")
    args = parser.parse_args(argv)

    import phi_onnx

    with phi_onnx.load(args.folder, device="cpu", backend=args.backend, threads=args.threads) as model:
        runs = counter(model)
        once(model, runs, True, args)  # warm-up: sessions, grammar compile, tokenizer
        passes: dict[bool, list[dict[str, Any]]] = {True: [], False: []}
        for _ in range(args.repeat):
            for on in (False, True):
                passes[on].append(once(model, runs, on, args))
    row: dict[str, Any] = {"folder": str(args.folder), "backend": args.backend, "temperature": args.temperature,
                           "repeat": args.repeat}
    for on, name in ((False, "off"), (True, "on")):
        first = passes[on][0]
        row[name] = {"tokens": first["tokens"], "runs": first["runs"], "finish_reason": first["finish_reason"],
                     "seconds": round(statistics.median(p["seconds"] for p in passes[on]), 4),
                     "decode_seconds": round(statistics.median(p["decode_seconds"] for p in passes[on]), 4)}
    row["same_tokens"] = all(p["token_ids"] == passes[False][0]["token_ids"] for p in passes[True] + passes[False])
    row["speedup"] = round(row["off"]["seconds"] / row["on"]["seconds"], 3)
    row["forced_share"] = round(1 - row["on"]["runs"] / max(row["off"]["runs"], 1), 3)
    row["reply"] = passes[True][0]["text"][:300]
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
