"""What every decoder-only family shares: graph inputs/outputs, embeddings, the LM head.

A family module subclasses `DecoderBuilder`, registers itself for its Hugging Face architecture
names, and writes `layer()` and `final_norm()`. The other hooks have defaults a family overrides only
where it differs: `check()` (settings it cannot build), `model_inputs()` (what every layer's attention
reads, built once per forward), `embedding()` (token ids → first hidden states), `lm_head()`, and
`write_assets()`. `build()` calls them in that order and owns the graph's inputs and outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx_ir as ir

from phi_onnx.export.embeddings import EMBEDDING, QuantizedTables
from phi_onnx.export.graph import GraphBuilder, Value
from phi_onnx.export.layers import AttentionInputs, attention_inputs, concat_loader, layer_norm, raise_shape
from phi_onnx.export.lora import LoraInputs, LoraTarget
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
        self.tables = QuantizedTables(options, self.w.io_dtype, self.w.np_dtype)
        #: LoRA inputs on the layers' projections (switchable adapters), when the export has adapters
        self.lora = LoraInputs(self.g, self.w.io_dtype, self.w.np_dtype) if options.adapters else None

    # -- hooks for families -------------------------------------------------------------------
    def check(self) -> None:
        """Raise UnsupportedModelError for settings this builder cannot build (before any work)."""

    def model_inputs(self, input_ids: Value, attention_mask: Value) -> AttentionInputs:
        """What every layer's attention reads (seqlens, total length, rotary tables), built once per forward."""
        return attention_inputs(self.g, self.cfg, input_ids, attention_mask, self.w.io_dtype)

    def embedding(self, input_ids: Value) -> Value:
        """The first hidden states: rows of the token embedding table (block-quantized when asked).

        Called inside the `model/embed_tokens` scope; the single place the embedding is built.
        """
        cfg, g = self.cfg, self.g
        if self.tables.embedding_bits() is None:
            return g.op("Gather", self.param(EMBEDDING, (cfg.vocab_size, cfg.hidden_size)), input_ids)
        self.param_shape(EMBEDDING, (cfg.vocab_size, cfg.hidden_size))
        return self.tables.embed(g, input_ids, self.load(EMBEDDING), cfg.vocab_size, cfg.hidden_size,
                                 cfg.tie_word_embeddings)

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

    def param_shape(self, name: str, shape: tuple[int, ...]) -> None:
        """Check a checkpoint tensor's shape against the one config.json implies."""
        info = self.ckpt.info(name)
        if info.shape != shape:
            raise_shape(name, info.shape, shape)

    def param(self, name: str, shape: tuple[int, ...]) -> Value:
        """A float parameter (norm weight, bias) named after the checkpoint tensor."""
        self.param_shape(name, shape)
        return self.w.tensor(self.g, name, shape, self.load(name))

    def linear(self, x: Value, scope: str, name: str, out_features: int, in_features: int,
               bias: str | None = None, rows: np.ndarray | None = None) -> Value:
        """A projection from checkpoint weight `name` ([out, in]) and optional `bias` ([out]), shape-checked
        against the config; `rows` reorders the output rows of both (a packed layout the graph wants)."""
        self.param_shape(name, (out_features, in_features))
        load = self.load(name)
        bias_load = None
        if bias:
            self.param_shape(bias, (out_features,))
            bias_load = self.load(bias)
        if rows is not None:
            load = _permuted(load, rows)
            bias_load = _permuted(bias_load, rows) if bias_load is not None else None
        if scope == "lm_head" and self.tables.takes_head(name):
            with self.g.scope(scope):
                y = self.tables.head(self.g, x, name, out_features, in_features, load)
                if bias_load is not None:
                    y = self.g.op("Add", y, self.w.tensor(self.g, f"{self.g.prefix}.bias", (out_features,), bias_load))
            return y
        y = self.w.linear(self.g, x, scope, out_features, in_features, load, bias_load)
        return self._lora(x, y, scope, LoraTarget((name,), (out_features,), in_features,
                                                   None if rows is None else tuple(int(r) for r in rows)))

    def _lora(self, x: Value, y: Value, scope: str, target: LoraTarget) -> Value:
        """`y` plus the LoRA branch, for a layer projection of an export with switchable adapters."""
        # Not in graphs built on another GraphBuilder (GPTQ's per-layer calibration stages swap `g`): with no
        # adapter bound the branch adds zeros, so those graphs compute the same without it.
        if self.lora is None or self.lora.g is not self.g or not target.weights[0].startswith("model.layers."):
            return y
        with self.g.scope(scope):
            return self.lora.apply(x, y, target)

    def layer_norm(self, name: str, x: Value) -> Value:
        """LayerNorm `name` (its `.weight` and `.bias`), in a scope named after its last part."""
        shape = (self.cfg.hidden_size,)
        gamma, beta = self.param(f"{name}.weight", shape), self.param(f"{name}.bias", shape)
        with self.g.scope(name.rsplit(".", 1)[-1]):
            return layer_norm(self.g, x, gamma, beta, self.cfg.norm_eps)

    def packed_qkv(self, x: Value, prefix: str, *, bias: bool | None = None) -> Value:
        """`{prefix}q_proj`, `k_proj` and `v_proj` as one packed projection (GroupQueryAttention's input).

        `bias`: True requires the three biases, False ignores them, None uses them when the checkpoint
        has them.
        """
        cfg = self.cfg
        widths = (cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim)
        names = [f"{prefix}{p}_proj" for p in "qkv"]
        weight = concat_loader(self.ckpt, [f"{n}.weight" for n in names], [(w, cfg.hidden_size) for w in widths])
        biased = f"{names[0]}.bias" in self.ckpt if bias is None else bias
        bias_load = concat_loader(self.ckpt, [f"{n}.bias" for n in names], [(w,) for w in widths]) if biased else None
        y = self.w.linear(self.g, x, "qkv_proj", sum(widths), cfg.hidden_size, weight, bias_load)
        return self._lora(x, y, "qkv_proj", LoraTarget(tuple(f"{n}.weight" for n in names), widths, cfg.hidden_size))

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
        attn = self.model_inputs(input_ids, attention_mask)
        with g.scope("model", "embed_tokens"):
            hidden = self.embedding(input_ids)
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


def _permuted(load: Callable[[], np.ndarray], rows: np.ndarray) -> Callable[[], np.ndarray]:
    return lambda: np.ascontiguousarray(load()[rows])
