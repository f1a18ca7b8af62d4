"""Phi-3, Phi-3.5-mini, Phi-3-medium, Phi-4 and Phi-4-mini (`Phi3ForCausalLM`).

RMSNorm, packed QKV with (partial) rotary, GQA or MHA, optional sliding window, LongRoPE, a
packed gate/up SiLU MLP, optional tied embeddings.
"""

from __future__ import annotations

from phi_onnx.errors import UnsupportedModelError
from phi_onnx.export.base import DecoderBuilder
from phi_onnx.export.graph import Value
from phi_onnx.export.layers import AttentionInputs, group_query_attention, rms_norm, silu_gated, skip_rms_norm


class Phi3Builder(DecoderBuilder):
    """Builds `Phi3ForCausalLM` checkpoints."""

    genai_type = "phi3"

    def check(self) -> None:
        """Refuse activations other than SiLU (the only one Phi-3 checkpoints use)."""
        if self.cfg.hidden_act not in ("silu", "swish"):
            raise UnsupportedModelError(f"Phi3ForCausalLM with hidden_act={self.cfg.hidden_act!r} is not supported.",
                                        hint="Phi-3 family checkpoints use 'silu'.")

    def norm(self, name: str, x: Value, residual: Value | None) -> tuple[Value, Value]:
        """RMSNorm `name`, fused with the residual add when there is one."""
        gamma = self.param(f"{name}.weight", (self.cfg.hidden_size,))
        with self.g.scope(name.rsplit(".", 1)[-1]):
            if residual is None:
                return rms_norm(self.g, x, gamma, self.cfg.norm_eps), x
            return skip_rms_norm(self.g, x, residual, gamma, self.cfg.norm_eps)

    def layer(self, i: int, hidden: Value, residual: Value | None, attn: AttentionInputs,
              past: tuple[Value, Value]) -> tuple[Value, Value, tuple[Value, Value]]:
        """input norm → attention → post-attention norm → MLP (residual adds fused into the norms)."""
        cfg, p = self.cfg, f"model.layers.{i}."
        x, residual = self.norm(p + "input_layernorm", hidden, residual)
        with self.g.scope("attn"):
            qkv_width = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
            qkv = self.linear(x, "qkv_proj", p + "self_attn.qkv_proj.weight", qkv_width, cfg.hidden_size)
            out, *present = group_query_attention(self.g, qkv, cfg, attn, *past)
            hidden = self.linear(out, "o_proj", p + "self_attn.o_proj.weight", cfg.hidden_size,
                                 cfg.num_heads * cfg.head_dim)
        x, residual = self.norm(p + "post_attention_layernorm", hidden, residual)
        with self.g.scope("mlp"):
            gate_up = self.linear(x, "gate_up_proj", p + "mlp.gate_up_proj.weight", 2 * cfg.intermediate_size,
                                  cfg.hidden_size)
            hidden = self.linear(silu_gated(self.g, gate_up, cfg.intermediate_size), "down_proj",
                                 p + "mlp.down_proj.weight", cfg.hidden_size, cfg.intermediate_size)
        return hidden, residual, (present[0], present[1])

    def final_norm(self, hidden: Value, residual: Value) -> Value:
        """The final RMSNorm, fused with the last residual add."""
        gamma = self.param("model.norm.weight", (self.cfg.hidden_size,))
        normed, _ = skip_rms_norm(self.g, hidden, residual, gamma, self.cfg.norm_eps)
        return normed
