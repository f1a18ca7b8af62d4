"""The short model names users type, mapped to Hugging Face hub ids."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KnownModel:
    """A Phi checkpoint phi-onnx knows by a short name."""

    name: str
    hub_id: str
    architecture: str
    description: str
    aliases: tuple[str, ...] = ()


KNOWN_MODELS: tuple[KnownModel, ...] = (
    KnownModel("tiny-phi3", "(bundled with phi-onnx)", "Phi3ForCausalLM",
               "a 4M-parameter Phi-3 trained on Python docstrings; for trying phi-onnx offline"),
    KnownModel("phi-2", "microsoft/phi-2", "PhiForCausalLM", "2.7B base model"),
    KnownModel("phi-3-mini-4k", "microsoft/Phi-3-mini-4k-instruct", "Phi3ForCausalLM",
               "3.8B, 4k context, sliding window 2047", aliases=("phi-3-mini",)),
    KnownModel("phi-3-mini-128k", "microsoft/Phi-3-mini-128k-instruct", "Phi3ForCausalLM",
               "3.8B, 128k context (LongRoPE)"),
    KnownModel("phi-3-small-8k", "microsoft/Phi-3-small-8k-instruct", "Phi3SmallForCausalLM",
               "7B, block-sparse attention"),
    KnownModel("phi-3-small-128k", "microsoft/Phi-3-small-128k-instruct", "Phi3SmallForCausalLM",
               "7B, block-sparse attention, 128k context"),
    KnownModel("phi-3-medium-4k", "microsoft/Phi-3-medium-4k-instruct", "Phi3ForCausalLM", "14B, GQA"),
    KnownModel("phi-3-medium-128k", "microsoft/Phi-3-medium-128k-instruct", "Phi3ForCausalLM",
               "14B, GQA, 128k context (LongRoPE)"),
    KnownModel("phi-3.5-mini", "microsoft/Phi-3.5-mini-instruct", "Phi3ForCausalLM",
               "3.8B, 128k context (LongRoPE)"),
    KnownModel("phi-3.5-moe", "microsoft/Phi-3.5-MoE-instruct", "PhimoeForCausalLM",
               "16x3.8B mixture of experts, top-2"),
    KnownModel("phi-4", "microsoft/phi-4", "Phi3ForCausalLM", "14B, GQA, 16k context"),
    KnownModel("phi-4-mini", "microsoft/Phi-4-mini-instruct", "Phi3ForCausalLM",
               "3.8B, GQA, partial rotary 0.75, tied embeddings, LongRoPE"),
    KnownModel("phi-4-mini-reasoning", "microsoft/Phi-4-mini-reasoning", "Phi3ForCausalLM",
               "Phi-4-mini tuned for reasoning"),
    KnownModel("phi-4-reasoning", "microsoft/Phi-4-reasoning", "Phi3ForCausalLM", "Phi-4 tuned for reasoning"),
)


def find_known_model(name: str) -> KnownModel | None:
    """The known model with this short name or alias (case-insensitive), or None."""
    key = name.strip().lower()
    for model in KNOWN_MODELS:
        if key == model.name or key in model.aliases:
            return model
    return None


def known_names() -> list[str]:
    """Every short name and alias, in table order."""
    names: list[str] = []
    for model in KNOWN_MODELS:
        names.append(model.name)
        names.extend(model.aliases)
    return names
