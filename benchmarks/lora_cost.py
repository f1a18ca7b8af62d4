"""What switchable LoRA costs: single-stream decode tok/s of an int4 export without LoRA inputs, of the same
export with LoRA inputs running the base (zero-rank stacks), and running one rank-R adapter.

The adapter is a synthetic PEFT LoRA (random A and B, rank R on qkv_proj, o_proj, gate_up_proj and
down_proj of every layer), written with safetensors' numpy API. Runs alternate round by round (the
machine is noisy) in one process; medians of decode tok/s over the timed rounds (one warm-up each).

    python benchmarks/lora_cost.py /tmp/phi-bench/phi3-mid --tokenizer-from /tmp/phi-bench/phi3-mid-int4 \
        --work /tmp/lora-cost --rounds 5
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
from pathlib import Path

import numpy as np

from phi_onnx.export import ExportOptions, export
from phi_onnx.source.checkpoint import Checkpoint

PROJECTIONS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


def synthetic_adapter(checkpoint: Path, folder: Path, rank: int, seed: int = 0) -> Path:
    """A PEFT LoRA adapter folder of rank `rank` on every projection of `checkpoint` (random A and B from `seed`)."""
    from safetensors.numpy import save_file

    config = json.loads((checkpoint / "config.json").read_text())
    base = Checkpoint(checkpoint)
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for projection in PROJECTIONS:
            out, inp = base.info(f"model.layers.{layer}.{projection}.weight").shape
            key = f"base_model.model.model.layers.{layer}.{projection}"
            tensors[f"{key}.lora_A.weight"] = (rng.standard_normal((rank, inp)) * 0.02).astype(np.float32)
            tensors[f"{key}.lora_B.weight"] = (rng.standard_normal((out, rank)) * 0.02).astype(np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank,
        "target_modules": [p.split(".")[-1] for p in PROJECTIONS]}))
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--work", type=Path, required=True, help="folder for the adapter and the two exports")
    parser.add_argument("--tokenizer-from", type=Path, help="copy tokenizer files from here (random checkpoints)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    import phi_onnx

    adapter = args.work / f"adapter-r{args.rank}"
    if not adapter.exists():
        synthetic_adapter(args.checkpoint, adapter, args.rank)
    exports = {"plain": args.work / "int4-plain", "lora": args.work / f"int4-lora-r{args.rank}"}
    for kind, out in exports.items():
        if not out.exists():
            options = ExportOptions(precision="int4", adapters=(("a", str(adapter)),) if kind == "lora" else ())
            export(args.checkpoint, out, options)
            for name in ("tokenizer.json", "tokenizer_config.json"):
                if args.tokenizer_from and (args.tokenizer_from / name).is_file() and not (out / name).exists():
                    shutil.copy2(args.tokenizer_from / name, out / name)
    plain = phi_onnx.load(exports["plain"], backend="ort", threads=args.threads)
    lora = phi_onnx.load(exports["lora"], backend="ort", threads=args.threads)
    prompt = np.random.default_rng(1).integers(10, 1000, args.prompt).tolist()
    runs = {"no LoRA inputs (plain int4)": (plain, None), "LoRA inputs, base (no adapter)": (lora, None),
            f"LoRA inputs, one rank-{args.rank} adapter": (lora, "a")}
    speeds: dict[str, list[float]] = {name: [] for name in runs}
    for round_ in range(args.rounds + 1):
        for name, (model, name_of_adapter) in runs.items():
            result = model.generate(prompt, adapter=name_of_adapter, max_new_tokens=args.new,
                                    min_new_tokens=args.new)
            if round_:  # round 0 warms up
                speeds[name].append(result.decode_tokens_per_second)
    reference = statistics.median(speeds["no LoRA inputs (plain int4)"])
    print(f"{args.checkpoint.name} int4, prompt {args.prompt}, {args.new} new tokens, {args.rounds} rounds")
    for name, values in speeds.items():
        median = statistics.median(values)
        print(f"{name:40s} {median:7.1f} tok/s  ({median / reference * 100:5.1f} %)  "
              f"[{', '.join(f'{v:.1f}' for v in values)}]")


if __name__ == "__main__":
    main()
