"""Shared fixtures: tiny random Phi checkpoints (built once per session) and their exports.

Every checkpoint is a real `transformers` model saved with `save_pretrained`, so the PyTorch
model on the same weights is the reference each export is compared against.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import cached_exports, phi4_mini_tools_tokenizer, save_tiny_checkpoint

#: The tiny checkpoints the tests share, as Phi3Config overrides. Sizes are kept so that the
#: vocab size equals no projection width, and each covers one configuration the exporter handles.
PHI3_CHECKPOINTS: dict[str, dict[str, Any]] = {
    # Phi-3-mini: MHA, head_dim 32, fused rotary.
    "phi3-mha": {},
    # Phi-3-medium / Phi-4: grouped-query attention.
    "phi3-gqa": {"num_key_value_heads": 2},
    # Phi-4-mini: GQA, partial rotary 0.75 of head_dim 64 (rotary 48, fused), tied embeddings,
    # LongRoPE with an original context of 64 so tests cross it.
    "phi4mini": {
        "hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 384,
        "partial_rotary_factor": 0.75, "tie_word_embeddings": True, "max_position_embeddings": 512,
        "original_max_position_embeddings": 64, "rope_scaling": {
            "type": "longrope", "short_factor": [1.0 + 0.02 * i for i in range(24)],
            "long_factor": [1.0 + 0.5 * i for i in range(24)]},
    },
    # Partial rotary whose cos/sin width (12) GroupQueryAttention cannot fuse: rotary runs as ops.
    "phi3-rot24": {"num_key_value_heads": 2, "partial_rotary_factor": 0.75,
                   "max_position_embeddings": 512, "original_max_position_embeddings": 64,
                   "rope_scaling": {"type": "longrope", "short_factor": [1.0 + 0.03 * i for i in range(12)],
                                    "long_factor": [1.0 + 0.7 * i for i in range(12)]}},
    # Phi-3-mini's sliding window, small enough for tests to cross.
    "phi3-window": {"sliding_window": 8},
}

BASE_CONFIG: dict[str, Any] = {
    "vocab_size": 1040, "hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 4, "intermediate_size": 320, "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 3, "pad_token_id": 3,
}


@pytest.fixture(scope="session", autouse=True)
def _private_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """No test writes to the user's local store (~/.cache/phi-onnx): PHI_ONNX_HOME points at a temp folder."""
    previous = os.environ.get("PHI_ONNX_HOME")
    os.environ["PHI_ONNX_HOME"] = str(tmp_path_factory.mktemp("phi-onnx-home"))
    yield
    if previous is None:
        os.environ.pop("PHI_ONNX_HOME", None)
    else:
        os.environ["PHI_ONNX_HOME"] = previous


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Phi-3-style tokenizer (vocab < 1040) trained offline, saved once per session."""
    from phi_onnx.tiny import build_tokenizer

    folder = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(folder, vocab_size=1000, template="phi3")
    return folder


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Callable[..., Path]:
    """`make_checkpoint(name)` → folder of a saved random Phi-3 (cached per name)."""
    cache: dict[str, Path] = {}

    def make(name: str) -> Path:
        if name not in cache:
            import torch
            from transformers import Phi3Config, Phi3ForCausalLM

            torch.manual_seed(sum(map(ord, name)))
            config = Phi3Config(**{**BASE_CONFIG, **PHI3_CHECKPOINTS[name]})
            model = Phi3ForCausalLM(config).eval()
            # Phi-3 stops on <|endoftext|> and <|end|>, both listed in generation_config.json.
            cache[name] = save_tiny_checkpoint(model, tmp_path_factory.mktemp(name), tokenizer_dir)
        return cache[name]

    return make


@pytest.fixture(scope="session")
def make_export(tmp_path_factory: pytest.TempPathFactory,
                make_checkpoint: Callable[..., Path]) -> Callable[..., Path]:
    """`make_export(name, precision="fp32", **options)` → exported folder (cached)."""
    return cached_exports(tmp_path_factory, make_checkpoint)


@pytest.fixture(scope="session")
def reference_model() -> Callable[[Path], Any]:
    """`reference_model(folder)` → the transformers model on the same weights (fp32, eval)."""
    cache: dict[Path, Any] = {}

    def load(folder: Path) -> Any:
        if folder not in cache:
            import torch
            from transformers import AutoModelForCausalLM

            cache[folder] = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        return cache[folder]

    return load


@pytest.fixture(scope="session")
def phi4_mini_tools_export(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """A random tiny Phi-3 exported (fp32) with Phi-4-mini's tool tokens (not special, as in its
    tokenizer.json) and its exact chat template: only constrained decoding makes it call tools right."""
    import torch
    from transformers import Phi3Config, Phi3ForCausalLM

    from phi_onnx.export import ExportOptions, export

    tokenizer = phi4_mini_tools_tokenizer(tokenizer_dir, tmp_path_factory.mktemp("phi4mini-tools-tokenizer"))
    torch.manual_seed(4)
    model = Phi3ForCausalLM(Phi3Config(**BASE_CONFIG)).eval()
    checkpoint = save_tiny_checkpoint(model, tmp_path_factory.mktemp("phi4mini-tools"), tokenizer)
    out = tmp_path_factory.mktemp("export") / "phi4mini-tools"
    export(checkpoint, out, ExportOptions(precision="fp32"))
    return out
