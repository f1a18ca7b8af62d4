"""What every decoder-only family shares: graph inputs/outputs, embeddings, the LM head.

A family module subclasses `DecoderBuilder`, registers itself for its Hugging Face architecture
names, and writes `layer()` (and `check()` for settings it cannot build).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx_ir as ir

from phi_onnx.export.graph import GraphBuilder, Value
from phi_onnx.export.layers import AttentionInputs, attention_inputs
from phi_onnx.export.options import ExportOptions
from phi_onnx.export.weights import Weights
from phi_onnx.source.checkpoint import Checkpoint
from phi_onnx.source.config import ModelConfig


class DecoderBuilder:
    """Builds a decoder-only causal LM graph in onnxruntime-genai's input/output convention.

    Inputs: `input_ids`, `attention_mask`, `past_key_values.N.key/value`;
    outputs: `logits` (fp32), `present.N.key/value`.
    """

    #: the genai_config `model.type` onnxruntime-genai knows this family by
    genai_type = "decoder"

    def __init__(self, config: ModelConfig, checkpoint: Checkpoint, options: ExportOptions) -> None:
        self.cfg = config
        self.ckpt = checkpoint
        self.options = options
        self.w = Weights(options)
        self.g = GraphBuilder()

    # -- hooks for families -------------------------------------------------------------------
    def check(self) -> None:
        """Raise UnsupportedModelError for settings this builder cannot build (before any work)."""

    def layer(self, i: int, hidden: Value, residual: Value | None, attn: AttentionInputs,
              past: tuple[Value, Value]) -> tuple[Value, Value, tuple[Value, Value]]:
        """One decoder layer: returns (layer output, residual stream, (present key, present value))."""
        raise NotImplementedError

    def write_assets(self, source: Path, folder: Path) -> None:
        """Write family-specific files into the export folder (after the tokenizer files are copied)."""

    def final_norm(self, hidden: Value, residual: Value) -> Value:
        """The norm before the LM head."""
        raise NotImplementedError

    # -- shared pieces ------------------------------------------------------------------------
    def load(self, name: str) -> Callable[[], np.ndarray]:
        """A loader for one checkpoint tensor (checked to exist now, read only when written)."""
        self.ckpt.info(name)
        return lambda: self.ckpt.read(name)

    def param(self, name: str, shape: tuple[int, ...]) -> Value:
        """A float parameter (norm weight, bias) named after the checkpoint tensor."""
        info = self.ckpt.info(name)
        if info.shape != shape:
            raise_shape(name, info.shape, shape)
        return self.w.tensor(self.g, name, shape, self.load(name))

    def linear(self, x: Value, scope: str, name: str, out_features: int, in_features: int,
               bias: str | None = None) -> Value:
        """A projection from checkpoint weight `name` ([out, in]), shape-checked against the config."""
        info = self.ckpt.info(name)
        if info.shape != (out_features, in_features):
            raise_shape(name, info.shape, (out_features, in_features))
        bias_load = self.load(bias) if bias else None
        return self.w.linear(self.g, x, scope, out_features, in_features, self.load(name), bias_load)

    def build(self) -> ir.Model:
        """The whole graph, with initializers still lazy."""
        self.check()
        g, cfg = self.g, self.cfg
        io = self.w.io_dtype
        input_ids = g.input("input_ids", ir.DataType.INT64, ["batch_size", "sequence_length"])
        attention_mask = g.input("attention_mask", ir.DataType.INT64, ["batch_size", "total_sequence_length"])
        kv_shape = ["batch_size", cfg.num_kv_heads, "past_sequence_length", cfg.head_dim]
        pasts = [(g.input(f"past_key_values.{i}.key", io, kv_shape),
                  g.input(f"past_key_values.{i}.value", io, kv_shape)) for i in range(cfg.num_layers)]
        attn = attention_inputs(g, cfg, input_ids, attention_mask, io)
        with g.scope("model", "embed_tokens"):
            table = self.param("model.embed_tokens.weight", (cfg.vocab_size, cfg.hidden_size))
            hidden = g.op("Gather", table, input_ids)
        residual: Value | None = None
        presents = []
        for i in range(cfg.num_layers):
            with g.scope("model", f"layers.{i}"):
                hidden, residual, present = self.layer(i, hidden, residual, attn, pasts[i])
            presents.append(present)
        assert residual is not None
        with g.scope("model", "norm"):
            normed = self.final_norm(hidden, residual)
        logits = self.lm_head(normed)
        if io != ir.DataType.FLOAT:
            with g.scope("lm_head"):
                logits = g.op("Cast", logits, to=ir.DataType.FLOAT)
        g.output(logits, "logits", ir.DataType.FLOAT, ["batch_size", "sequence_length", cfg.vocab_size])
        present_shape = ["batch_size", cfg.num_kv_heads, "total_sequence_length", cfg.head_dim]
        for i, (key, value) in enumerate(presents):
            g.output(key, f"present.{i}.key", io, present_shape)
            g.output(value, f"present.{i}.value", io, present_shape)
        self.w.flush(g)
        from phi_onnx import __version__

        return g.model(producer_version=__version__)

    def lm_head(self, x: Value) -> Value:
        """Logits from the final hidden state; tied models reuse the embedding matrix."""
        cfg = self.cfg
        name = "lm_head.weight"
        if cfg.tie_word_embeddings or name not in self.ckpt:
            name = "model.embed_tokens.weight"
        bias = "lm_head.bias" if "lm_head.bias" in self.ckpt else None
        return self.linear(x, "lm_head", name, cfg.vocab_size, cfg.hidden_size, bias)


def raise_shape(name: str, actual: tuple[int, ...], expected: tuple[int, ...]) -> None:
    """A clear error for a tensor whose shape disagrees with config.json."""
    from phi_onnx.errors import CheckpointError

    raise CheckpointError(f"Tensor {name!r} has shape {actual}, but config.json implies {expected}.",
                          hint="The weights and config.json do not belong together.")
