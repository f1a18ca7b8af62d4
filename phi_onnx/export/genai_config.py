"""The genai_config.json onnxruntime-genai reads next to model.onnx."""

from __future__ import annotations

from typing import Any

from phi_onnx.export.options import ExportOptions
from phi_onnx.source.config import ModelConfig

DEFAULT_MAX_LENGTH = 4096


def genai_config(cfg: ModelConfig, options: ExportOptions, model_type: str) -> dict[str, Any]:
    """A genai_config for a model built with `options`.

    `max_length` is capped (default 4096) because onnxruntime-genai preallocates the KV cache for
    it: a 128k-context model would otherwise reserve the whole context for every generator.
    `intra_op_num_threads` is written for CPU because onnxruntime-genai otherwise ran on one core
    (measured: half the speed on a 2-core machine); 0 lets ONNX Runtime use every physical core.
    """
    eos = list(cfg.eos_token_ids) or [0]
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else eos[0]
    max_length = min(cfg.max_position_embeddings, options.max_length or DEFAULT_MAX_LENGTH)
    session: dict[str, Any] = {"log_id": "onnxruntime-genai", "provider_options": []}
    if options.device == "cuda":
        session["provider_options"] = [{"cuda": {"enable_cuda_graph": "0"}}]
    else:
        session["intra_op_num_threads"] = 0
    return {
        "model": {
            "bos_token_id": cfg.bos_token_id if cfg.bos_token_id is not None else eos[0],
            "context_length": cfg.max_position_embeddings,
            "decoder": {
                "session_options": session,
                "filename": "model.onnx",
                "head_size": cfg.head_dim,
                "hidden_size": cfg.hidden_size,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": cfg.num_heads,
                "num_hidden_layers": cfg.num_layers,
                "num_key_value_heads": cfg.num_kv_heads,
            },
            "eos_token_id": eos if len(eos) > 1 else eos[0],
            "pad_token_id": pad,
            "type": model_type,
            "vocab_size": cfg.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": max_length,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": True,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }
