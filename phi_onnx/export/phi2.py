"""Phi-2 (and Phi-1/1.5, same architecture: `PhiForCausalLM`).

LayerNorm with bias, attention and MLP in parallel on the same normed input, biased q/k/v
(packed into one projection here) and `dense`, partial rotary (32 of 80 channels in Phi-2), a
tanh-GELU `fc1`/`fc2` MLP with biases, `final_layernorm`, a biased LM head.
"""

from __future__ import annotations

from phi_onnx.errors import UnsupportedModelError
from phi_onnx.export.base import DecoderBuilder
from phi_onnx.export.graph import Value
from phi_onnx.export.layers import AttentionInputs, gelu_tanh, group_query_attention, residual_sum

#: transformers' activations that are all 0.5 x (1 + tanh(sqrt(2/π) (x + 0.044715 x³))).
GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


class Phi2Builder(DecoderBuilder):
    """Builds `PhiForCausalLM` checkpoints."""

    genai_type = "phi"

    def check(self) -> None:
        """Refuse what Phi checkpoints do not use: q/k LayerNorm, non-tanh GELU activations."""
        if self.cfg.qk_layernorm:
            raise UnsupportedModelError("PhiForCausalLM with qk_layernorm=true is not supported.",
                                        hint="Released Phi-1, Phi-1.5 and Phi-2 checkpoints do not use it.")
        if self.cfg.hidden_act not in GELU_TANH:
            raise UnsupportedModelError(f"PhiForCausalLM with hidden_act={self.cfg.hidden_act!r} is not supported.",
                                        hint="Phi-2 uses 'gelu_new' (tanh GELU).")

    def layer(self, i: int, hidden: Value, residual: Value | None, attn: AttentionInputs,
              past: tuple[Value, Value]) -> tuple[Value, Value, tuple[Value, Value]]:
        """`attn(ln(x)) + mlp(ln(x)) + x`; the residual stream is the layer output itself."""
        cfg, p = self.cfg, f"model.layers.{i}."
        x = self.layer_norm(p + "input_layernorm", hidden)
        with self.g.scope("attn"):
            qkv = self.packed_qkv(x, p + "self_attn.", bias=True)  # biased q/k/v_proj
            out, *present = group_query_attention(self.g, qkv, cfg, attn, *past)
            attn_out = self.linear(out, "dense", p + "self_attn.dense.weight", cfg.hidden_size,
                                   cfg.num_heads * cfg.head_dim, bias=p + "self_attn.dense.bias")
        with self.g.scope("mlp"):
            h = self.linear(x, "fc1", p + "mlp.fc1.weight", cfg.intermediate_size, cfg.hidden_size,
                            bias=p + "mlp.fc1.bias")
            mlp_out = self.linear(gelu_tanh(self.g, h), "fc2", p + "mlp.fc2.weight", cfg.hidden_size,
                                  cfg.intermediate_size, bias=p + "mlp.fc2.bias")
        with self.g.scope("residual"):
            hidden = residual_sum(self.g, attn_out, mlp_out, hidden)  # transformers' order, bit for bit
        return hidden, hidden, (present[0], present[1])

    def final_norm(self, hidden: Value, residual: Value) -> Value:
        """`final_layernorm` on the last layer's output."""
        return self.layer_norm("model.final_layernorm", hidden)
