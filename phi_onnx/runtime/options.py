"""GenerationOptions: how to pick tokens and when to stop, validated once (no numpy: the CLI imports it).

The sampler that applies them is `phi_onnx.runtime.sampling`.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from phi_onnx.errors import OptionsError

DEFAULT_MAX_NEW_TOKENS = 256


@dataclass(frozen=True)
class GenerationOptions:
    """How to pick tokens and when to stop.

    Each field is also a command-line option of `generate` and `chat` (`--max-new-tokens`, ...), made
    by `phi_onnx.cli.options.generation_options` from the field's type and its metadata's "help".

    Attributes:
        max_new_tokens: most tokens to generate (also capped by the context).
        min_new_tokens: EOS ids are suppressed until this many tokens exist.
        temperature: 0 is greedy (the default); > 0 samples from softmax(logits / temperature).
        top_k: sample only among the k most likely tokens (0: off).
        top_p: nucleus sampling: the smallest set with this much probability (1.0: off).
        repetition_penalty: transformers' penalty on every token already in the sequence (1.0: off).
        seed: seeds the sampler for reproducible sampled runs (None: random).
        stop: strings that end the reply; the reply's text ends before the first one.
    """

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    min_new_tokens: int = field(default=0, metadata={"help": "Suppress EOS until this many tokens."})
    temperature: float = field(default=0.0, metadata={"help": "0 (default) is greedy; > 0 samples."})
    top_k: int = field(default=0, metadata={"help": "Sample among the k most likely tokens."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling, in (0, 1]."})
    repetition_penalty: float = field(default=1.0, metadata={"help": "transformers' penalty (1.0: off)."})
    seed: int | None = field(default=None, metadata={"help": "Seed for reproducible sampling."})
    stop: tuple[str, ...] = field(default=(), metadata={"help": "Stop string (repeatable); the reply ends before it."})

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif self.stop is None or isinstance(self.stop, (list, tuple, set, frozenset)):
            object.__setattr__(self, "stop", tuple(self.stop or ()))
        else:
            raise OptionsError(f"stop must be a string or a list of strings (got {type(self.stop).__name__} "
                               f"{self.stop!r}).", hint="Use e.g. stop=['\\n\\n'] or --stop '\\n\\n'.")
        _check(_whole(self.max_new_tokens) and self.max_new_tokens >= 1,
               f"max_new_tokens must be a whole number of at least 1 (got {self.max_new_tokens!r}).",
               "Use e.g. max_new_tokens=64 (--max-new-tokens 64).")
        _check(_whole(self.min_new_tokens) and 0 <= self.min_new_tokens <= self.max_new_tokens,
               f"min_new_tokens must be between 0 and max_new_tokens ({self.max_new_tokens}), "
               f"got {self.min_new_tokens!r}.", "Lower min_new_tokens or raise max_new_tokens.")
        _check(_finite(self.temperature) and self.temperature >= 0,
               f"temperature must be 0 (greedy) or positive (got {self.temperature!r}).",
               "Use 0 for greedy decoding or e.g. 0.7 to sample.")
        _check(_whole(self.top_k) and self.top_k >= 0,
               f"top_k must be 0 (off) or a positive integer (got {self.top_k!r}).", "Use e.g. --top-k 50.")
        _check(_finite(self.top_p) and 0 < self.top_p <= 1,
               f"top_p must be in (0, 1] (got {self.top_p!r}).", "Use e.g. --top-p 0.9 (1.0 turns it off).")
        _check(_finite(self.repetition_penalty) and self.repetition_penalty > 0,
               f"repetition_penalty must be positive (got {self.repetition_penalty!r}).",
               "Use 1.0 (off) or e.g. 1.1.")
        _check(self.seed is None or (_whole(self.seed) and self.seed >= 0),
               f"seed must be a non-negative integer (got {self.seed!r}).", "Use e.g. --seed 0.")
        _check(all(isinstance(s, str) and s for s in self.stop),
               f"stop strings must be non-empty strings (got {list(self.stop)!r}).", "Use e.g. --stop '\\n\\n'.")

    @property
    def do_sample(self) -> bool:
        """Whether tokens are drawn at random (temperature > 0) or chosen greedily."""
        return self.temperature > 0

    @classmethod
    def from_kwargs(cls, base: GenerationOptions | None = None, **kwargs: Any) -> GenerationOptions:
        """`base` with `kwargs` applied; an unknown name raises OptionsError listing the valid ones."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise OptionsError(f"Unknown generation option(s): {', '.join(unknown)}.",
                               hint=f"Valid options: {', '.join(sorted(names))}.")
        values = asdict(base) if base else {}
        values.update({k: v for k, v in kwargs.items() if v is not None})
        return cls(**values)


def _whole(value: Any) -> bool:
    # bool is an int subclass, but max_new_tokens=True is a mistake, not 1
    # numpy registers its integer types as numbers.Integral: they count, without importing numpy here
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check(ok: bool, message: str, hint: str) -> None:
    if not ok:
        raise OptionsError(message, hint=hint)
