"""Export sizes of Phi-shaped models per int4 layout, against the layout of onnxruntime-genai's builder int4.

Computed: the graph is built from a checkpoint whose safetensors hold headers only (sparse files,
no weights are generated or read) and the initializers' bytes are summed from their shapes and
dtypes, which is what the export writes to model.onnx.data. `--measure PRESET` also writes one
real export of that preset (random weights from make_random_checkpoint.py) and reports `du`.

    python benchmarks/export_sizes.py                       # computed, all presets
    python benchmarks/export_sizes.py --measure phi3-mid    # plus one real export, measured
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_random_checkpoint import PRESETS, Shape, _nbytes, make_checkpoint, plan_shards, write_config

from phi_onnx.export import ExportOptions

VARIANTS: dict[str, dict[str, object]] = {
    "builder's layout (rtn-32, full embedding, 4-bit head)": {"algo": "rtn", "embeddings": "full",
                                                              "lm_head_bits": 4},
    "default (int8 embedding, 8-bit head)": {},
    "int4 embedding, 8-bit head": {"embeddings": "int4"},
    "rtn, int4 embedding, 4-bit head (the default before)": {"algo": "rtn", "embeddings": "int4",
                                                             "lm_head_bits": 4},
    "--block-size 128 (default tables)": {"block_size": 128},
}
#: Shown as the default's size x (1 + budget): the most `--mix auto` may add (which projections it picks
#: depends on the weights, the bytes each costs do not: an [N, K] projection adds N x K / 2 bytes).
MIX_BUDGET = 0.10


def header_only_checkpoint(out: Path, shape: Shape) -> None:
    """A checkpoint folder whose shards are a safetensors header followed by a sparse hole."""
    out.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    shards = plan_shards(shape, 2 * 1024**3)
    for i, tensors in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, dims in tensors:
            header[name] = {"dtype": "BF16", "shape": list(dims), "data_offsets": [offset, offset + _nbytes(dims)]}
            offset += _nbytes(dims)
            weight_map[name] = file
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        with (out / file).open("wb") as handle:
            handle.write(struct.pack("<Q", len(encoded)) + encoded)
            handle.truncate(8 + len(encoded) + offset)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    write_config(out, shape, 1, 2)


def weight_bytes(checkpoint: Path, options: ExportOptions) -> int:
    """Bytes of every initializer the export of `checkpoint` with `options` writes."""
    from phi_onnx.export.registry import builder_for
    from phi_onnx.source.checkpoint import Checkpoint
    from phi_onnx.source.config import load_config

    cfg = load_config(checkpoint)
    model = builder_for(cfg.architecture)(cfg, Checkpoint(checkpoint), options).build()
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def main(argv: list[str] | None = None) -> None:
    """Print a Markdown table of export sizes (GB = 1e9 bytes)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="*", default=["phi3-mini", "phi4-mini", "phi4"])
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--measure", choices=sorted(PRESETS), help="also write real exports of this preset")
    parser.add_argument("--work", type=Path, help="folder for checkpoints/exports (default: a temp folder)")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="phi-sizes-"))
    print("| shape | " + " | ".join(VARIANTS) + f" | default + --mix auto (at most +{MIX_BUDGET:.0%}) |")
    print("|---" * (len(VARIANTS) + 2) + "|")
    for preset in args.presets:
        folder = work / f"{preset}-headers"
        header_only_checkpoint(folder, PRESETS[preset])
        sizes = [weight_bytes(folder, ExportOptions(precision="int4", **{"block_size": args.block_size, **kw}))  # type: ignore[arg-type]
                 for kw in VARIANTS.values()]
        sizes.append(int(sizes[1] * (1 + MIX_BUDGET)))
        cells = [f"{sizes[0] / 1e9:.2f} GB"] + [f"{s / 1e9:.2f} GB ({s / sizes[0]:.2f}x)" for s in sizes[1:]]
        print(f"| {preset} (computed) | " + " | ".join(cells) + " |")
        shutil.rmtree(folder)
    if args.measure:
        from phi_onnx.export import export

        source = work / f"{args.measure}-random"
        make_checkpoint(source, PRESETS[args.measure])
        sizes = []
        for i, kw in enumerate(VARIANTS.values()):
            out = work / f"{args.measure}-export-{i}"
            export(source, out, ExportOptions(precision="int4", **{"block_size": args.block_size, **kw}))  # type: ignore[arg-type]
            sizes.append(sum(p.stat().st_size for p in out.iterdir() if p.is_file()))
            shutil.rmtree(out)
        cells = [f"{sizes[0] / 1e9:.2f} GB"] + [f"{s / 1e9:.2f} GB ({s / sizes[0]:.2f}x)" for s in sizes[1:]]
        print(f"| {args.measure} (measured, whole folder) | " + " | ".join(cells) + " |")
        shutil.rmtree(source)


if __name__ == "__main__":
    main()
