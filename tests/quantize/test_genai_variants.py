"""Every int4 variant loads in onnxruntime-genai, and its greedy tokens equal phi-onnx's own ort backend's."""

from __future__ import annotations

import pytest

import phi_onnx
from phi_onnx.export import ExportOptions, export
from phi_onnx.quantize.onnx_model import quantize_folder

pytest.importorskip("onnxruntime_genai")

PROMPT = "def join(a, b):"


def test_genai_runs_every_variant_with_the_ort_backend_tokens(make_checkpoint, make_export, tmp_path):
    source = make_checkpoint("phi4mini")  # GQA, tied embeddings, partial rotary, LongRoPE
    variants = {
        "gptq-128": ExportOptions(algo="gptq", block_size=128),
        "gptq-asym-32": ExportOptions(algo="gptq", block_size=32, symmetric=False, embeddings="full"),
        "clip-asym-64": ExportOptions(algo="clip", block_size=64, symmetric=False),
    }
    folders = {}
    for name, options in variants.items():
        export(source, tmp_path / name, options)
        folders[name] = tmp_path / name
    quantize_folder(make_export("phi4mini"), tmp_path / "quantized-clip", algo="clip")
    folders["quantized-clip"] = tmp_path / "quantized-clip"
    for name, folder in folders.items():
        genai = phi_onnx.load(folder, device="cpu", backend="genai").generate(PROMPT, max_new_tokens=24,
                                                                              min_new_tokens=24)
        ort = phi_onnx.load(folder, device="cpu", backend="ort").generate(PROMPT, max_new_tokens=24,
                                                                          min_new_tokens=24)
        assert len(genai.token_ids) == 24, name
        assert genai.token_ids == ort.token_ids, name
