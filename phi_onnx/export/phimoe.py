"""Phi-3.5-MoE (`PhimoeForCausalLM`; hub configs spell it `PhiMoEForCausalLM`).

LayerNorm with bias, attention with optional biases (q/k/v packed here), LongRoPE with
short/long mscale, and a sparse MLP: 16 SiLU-gated experts, two per token, chosen and weighted by
Phi's sparse mixer.

LongRoPE takes the long factors past the original context, as Microsoft's modeling_phimoe.py,
vLLM and onnxruntime-genai do. transformers 5.23's PhimoeRotaryEmbedding keeps the short factors
there (it switches only the mscale); the tests patch their reference accordingly and check that
this is still what transformers does.

The experts run in ORT's `MoE` (float) and `QMoE` (int4) contrib ops. Neither implements the
sparse mixer on CPU (`use_sparse_mixer` is ignored there: measured, routing becomes plain
softmax top-2, 4.2 max abs off transformers), so the mixer is built from standard ops and the ops
only dispatch tokens to the experts it chose:

* QMoE takes `router_weights`: it picks the experts with the largest `router_probs` and mixes with
  `router_weights` at those experts, so passing the mixer's weights there is exact.
* MoE mixes with softmax(router_probs) at the top-2. With router_probs = log(w) (-inf off the
  two chosen experts) that is w / (w1 + w2); multiplying the output by (w1 + w2) gives back w.
  Measured on CPU: 7e-7 max abs against transformers' block, QMoE 2e-6 against its dequantized
  reference.

CPU MoE accepts only interleaved SwiGLU weights (swiglu_fusion=1), so fc1 holds gate and up rows
alternately; SwiGLU with alpha 1, beta 0 and no limit is silu(gate) * up.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from phi_onnx.errors import UnsupportedModelError
from phi_onnx.export.base import DecoderBuilder
from phi_onnx.export.graph import Value
from phi_onnx.export.layers import AttentionInputs, concat_loader, group_query_attention, residual_sum
from phi_onnx.quantize.int4 import Int4Weight


class PhimoeBuilder(DecoderBuilder):
    """Builds `PhimoeForCausalLM` checkpoints."""

    genai_type = "phimoe"

    def check(self) -> None:
        """Refuse settings the sparse mixer and the expert ops here do not cover."""
        cfg, opts = self.cfg, self.options
        if cfg.num_experts < 2 or cfg.experts_per_token != 2:
            raise UnsupportedModelError(
                f"PhimoeForCausalLM with {cfg.num_experts} experts and {cfg.experts_per_token} per token is "
                "not supported.", hint="Phi's sparse mixer routes each token to exactly 2 experts.")
        if cfg.hidden_act not in ("silu", "swish"):
            raise UnsupportedModelError(f"PhimoeForCausalLM with hidden_act={cfg.hidden_act!r} is not supported.",
                                        hint="Phi-3.5-MoE uses 'silu'.")
        if opts.precision == "int4" and (cfg.hidden_size % opts.block_size or cfg.intermediate_size % opts.block_size):
            raise UnsupportedModelError(
                f"int4 block size {opts.block_size} does not divide the experts' widths "
                f"({cfg.hidden_size}, {cfg.intermediate_size}), which ORT's QMoE requires.",
                hint="Choose a smaller --block-size.")

    def layer(self, i: int, hidden: Value, residual: Value | None, attn: AttentionInputs,
              past: tuple[Value, Value]) -> tuple[Value, Value, tuple[Value, Value]]:
        """input norm → attention → residual → post-attention norm → sparse MoE → residual."""
        cfg, g, p = self.cfg, self.g, f"model.layers.{i}."
        x = self.layer_norm(p + "input_layernorm", hidden)
        with g.scope("attn"):
            # q/k/v biases when the config sets `attention_bias` (true in Phi-3.5-MoE)
            out, *present = group_query_attention(g, self.packed_qkv(x, p + "self_attn."), cfg, attn, *past)
            o_bias = p + "self_attn.o_proj.bias"
            out = self.linear(out, "o_proj", p + "self_attn.o_proj.weight", cfg.hidden_size,
                              cfg.num_heads * cfg.head_dim, bias=o_bias if o_bias in self.ckpt else None)
        with g.scope("residual"):
            hidden = residual_sum(g, hidden, out)
        x = self.layer_norm(p + "post_attention_layernorm", hidden)
        with g.scope("moe"):
            out = self.moe(x, p + "block_sparse_moe.")
        with g.scope("residual_1"):
            hidden = residual_sum(g, hidden, out)
        return hidden, hidden, (present[0], present[1])

    def final_norm(self, hidden: Value, residual: Value) -> Value:
        """The final LayerNorm."""
        return self.layer_norm("model.norm", hidden)

    # -- sparse MoE -----------------------------------------------------------------------------
    def moe(self, x: Value, prefix: str) -> Value:
        """The sparse MLP: fp32 router → sparse mixer → the two chosen experts per token."""
        cfg, g, io = self.cfg, self.g, self.w.io_dtype
        hidden, experts = cfg.hidden_size, cfg.num_experts
        tokens = g.op("Reshape", x, g.const([-1, hidden], np.int64))
        with g.scope("router"):
            # Routing is discrete, so it runs in fp32 whatever the export's precision (the router
            # is [experts, hidden], too small to matter for size or speed).
            weight = g.weight(f"{prefix}gate.weight.T", ir.DataType.FLOAT, (hidden, experts),
                              self._rows(f"{prefix}gate.weight", (experts, hidden), transpose=True))
            source = tokens if io == ir.DataType.FLOAT else g.op("Cast", tokens, to=ir.DataType.FLOAT)
            routing = self.sparse_mixer(g.op("MatMul", source, weight))
            log_routing = g.op("Log", routing)  # -inf off the chosen experts
            if io != ir.DataType.FLOAT:
                routing, log_routing = g.op("Cast", routing, to=io), g.op("Cast", log_routing, to=io)
        attrs = {"k": 2, "activation_type": "swiglu", "swiglu_fusion": 1, "activation_alpha": 1.0,
                 "activation_beta": 0.0, "normalize_routing_weights": 0, "use_sparse_mixer": 0}
        if self.options.precision == "int4":
            fc1, fc2 = self._int4_experts(prefix, "fc1"), self._int4_experts(prefix, "fc2")
            out = g.ms("QMoE", tokens, log_routing, fc1[0], fc1[1], None, fc2[0], fc2[1], None, None, None, None,
                       fc1[2], fc2[2], None, routing, **attrs, expert_weight_bits=4,
                       block_size=self.options.block_size, weights_prepacked=0,
                       accuracy_level=self.options.effective_accuracy_level)
        else:
            # Written expert by expert: a real layer's stacked fc1 is 3.4 GB in fp32.
            fc1, fc2 = (g.stacked_weight(f"{prefix}experts.{fc}", io, self._fc_shape(fc),
                                         self._expert_loaders(prefix, fc), self.w.np_dtype) for fc in ("fc1", "fc2"))
            out = g.ms("MoE", tokens, log_routing, fc1, None, fc2, **attrs)
            # MoE mixed with w / (w1 + w2); scale back to the mixer's weights.
            total = g.op("ReduceSum", routing, g.const([-1], np.int64), keepdims=1)
            out = g.op("Mul", out, total)
        return g.op("Reshape", out, g.op("Shape", x))

    def sparse_mixer(self, scores: Value) -> Value:
        """transformers' `sparsemixer` in eval mode, op for op: dense weights [tokens, experts].

        Each pick takes the best remaining expert, masks experts whose relative gap to it,
        (top - score) / max(|score|, top), exceeds 2 * jitter_eps, and weighs the pick by its
        softmax over the unmasked ones. The second pick starts with the first expert at -inf.
        """
        g, cfg = self.g, self.cfg
        neg_inf = g.const(np.float32(-np.inf))
        threshold = g.const(np.float32(2 * cfg.router_jitter_noise))
        magnitude = g.op("Abs", scores)
        experts = g.const(np.arange(cfg.num_experts, dtype=np.int64))

        def pick(masked: Value) -> tuple[Value, Value]:
            top = g.op("ReduceMax", masked, g.const([-1], np.int64), keepdims=1)
            index = g.op("ArgMax", masked, axis=-1, keepdims=1)  # first index on ties, like torch.max
            far = g.op("Greater", g.op("Div", g.op("Sub", top, scores), g.op("Max", magnitude, top)), threshold)
            gates = g.op("Softmax", g.op("Where", far, neg_inf, masked), axis=-1)
            return g.op("Equal", experts, index), g.op("GatherElements", gates, index, axis=-1)

        first, w1 = pick(scores)
        second, w2 = pick(g.op("Where", first, neg_inf, scores))
        zero = g.const(np.float32(0.0))
        return g.op("Where", first, w1, g.op("Where", second, w2, zero))

    # -- expert weights -------------------------------------------------------------------------
    def _fc_shape(self, fc: str) -> tuple[int, int, int]:
        """fc1: [experts, 2 * intermediate, hidden] (gate/up rows interleaved); fc2: [experts, hidden, intermediate]."""
        cfg = self.cfg
        if fc == "fc1":
            return cfg.num_experts, 2 * cfg.intermediate_size, cfg.hidden_size
        return cfg.num_experts, cfg.hidden_size, cfg.intermediate_size

    def _rows(self, name: str, shape: tuple[int, int], transpose: bool = False) -> Callable[[], np.ndarray]:
        """A shape-checked loader for one 2-D checkpoint tensor."""
        load = concat_loader(self.ckpt, [name], [shape])
        return (lambda: np.ascontiguousarray(load().T)) if transpose else load

    def _expert(self, prefix: str, fc: str, e: int) -> Callable[[], np.ndarray]:
        """Expert `e`'s fc1 ([gate, up] rows interleaved: w1 and w3) or fc2 (w2) as [out, in]."""
        cfg = self.cfg
        base = f"{prefix}experts.{e}."
        if fc == "fc2":
            return self._rows(base + "w2.weight", (cfg.hidden_size, cfg.intermediate_size))
        gate = self._rows(base + "w1.weight", (cfg.intermediate_size, cfg.hidden_size))
        up = self._rows(base + "w3.weight", (cfg.intermediate_size, cfg.hidden_size))
        return lambda: np.stack([gate(), up()], axis=1).reshape(2 * cfg.intermediate_size, cfg.hidden_size)

    def _expert_loaders(self, prefix: str, fc: str) -> list[Callable[[], np.ndarray]]:
        """Every expert's fc1 or fc2 loader, in expert order."""
        return [self._expert(prefix, fc, e) for e in range(self.cfg.num_experts)]

    def _int4_experts(self, prefix: str, fc: str) -> tuple[Value, Value, Value | None]:
        """QMoE's (weights, scales, zero points) for fc1 or fc2, in MatMulNBits' blocks per expert row.

        Each part is written expert by expert (a real fc1 in fp32 is 3.4 GB for all 16 at once). An
        expert is quantized once, when the first part needs it, and dropped when every part has
        written it.
        """
        g, opts, io = self.g, self.options, self.w.io_dtype
        experts, n, k = self._fc_shape(fc)
        blocks = k // opts.block_size
        loads = self._expert_loaders(prefix, fc)
        parts = 2 if opts.symmetric else 3
        lock = threading.Lock()  # the parts are written by two threads
        cache: dict[int, Int4Weight] = {}
        reads: dict[int, int] = {}

        def expert(e: int) -> Int4Weight:
            with lock:
                if e not in cache:
                    cache[e] = self.w.quantize(f"{prefix}.{fc}.{e}", loads[e])
                    reads[e] = 0
                quantized = cache[e]
                reads[e] += 1
                if reads[e] == parts:
                    del cache[e]  # a later save quantizes again
                return quantized

        def per_expert(select: Callable[[Int4Weight], np.ndarray]) -> list[Callable[[], np.ndarray]]:
            return [lambda e=e: select(expert(e)) for e in range(experts)]

        key = f"{prefix}experts.{fc}"
        packed = g.stacked_weight(f"{key}.weight_q4", ir.DataType.UINT8, (experts, n, k // 2),
                                  per_expert(lambda q: q.packed.reshape(n, k // 2)), np.uint8)
        scales = g.stacked_weight(f"{key}.weight_scales", io, (experts, n, blocks),
                                  per_expert(lambda q: q.scales.reshape(n, blocks)), self.w.np_dtype)
        zero_points = None
        if not opts.symmetric:
            zp_width = (blocks + 1) // 2
            zero_points = g.stacked_weight(f"{key}.weight_zp", ir.DataType.UINT8, (experts, n, zp_width),
                                           per_expert(lambda q: q.zero_points.reshape(n, zp_width)),  # type: ignore[union-attr]
                                           np.uint8)
        return packed, scales, zero_points
