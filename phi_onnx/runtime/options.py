"""GenerationOptions: how to pick tokens and when to stop, validated once (no numpy: the CLI imports it).

The sampler that applies them is `phi_onnx.runtime.sampling`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from phi_onnx.errors import OptionsError

DEFAULT_MAX_NEW_TOKENS = 256
#: Most alternatives `top_logprobs` may ask for (OpenAI's limit).
MAX_TOP_LOGPROBS = 20
#: OpenAI's range for logit_bias values and presence/frequency penalties.
MAX_BIAS = 100.0
MAX_PENALTY = 2.0

#: A logits processor: (token ids so far — prompt and generated —, scores [vocab]) -> scores. It may
#: change `scores` in place and return it. Grammars (constrained decoding) plug in here.
LogitsProcessor = Callable[[list[int], Any], Any]


def bind_processors(processors: tuple[LogitsProcessor, ...]) -> tuple[LogitsProcessor, ...]:
    """`processors` with each per-sequence factory — one with a `for_sequence()` method, such as a
    grammar (`phi_onnx.runtime.grammar.GrammarProcessor`) — replaced by a new instance of its own.

    Options are shared by every sequence of a request (a static batch); a processor with state (a
    grammar's matcher) must not be, so `SequenceState` binds them once per sequence.
    """
    return tuple(p.for_sequence() if callable(getattr(p, "for_sequence", None)) else p for p in processors)


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
        presence_penalty: OpenAI's: subtracted once from every token already generated (-2..2).
        frequency_penalty: OpenAI's: subtracted per occurrence in the generated tokens (-2..2).
        logit_bias: {token id: bias} added to those logits (-100..100), as OpenAI's; also accepted as
            "ID=BIAS" strings (the CLI's --logit-bias).
        logprobs: report each chosen token's log-probability (of the model's distribution, before
            penalties and temperature).
        top_logprobs: also report the k most likely tokens at each step (0..20; implies logprobs).
        logits_processors: callables applied, in order, to each step's scores before sampling
            (`LogitsProcessor`); library only.
        adapter: the switchable LoRA adapter to run (a name in `Model.adapters`); None runs the base.
    """

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    min_new_tokens: int = field(default=0, metadata={"help": "Suppress EOS until this many tokens."})
    temperature: float = field(default=0.0, metadata={"help": "0 (default) is greedy; > 0 samples."})
    top_k: int = field(default=0, metadata={"help": "Sample among the k most likely tokens."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling, in (0, 1]."})
    repetition_penalty: float = field(default=1.0, metadata={"help": "transformers' penalty (1.0: off)."})
    seed: int | None = field(default=None, metadata={"help": "Seed for reproducible sampling."})
    stop: tuple[str, ...] = field(default=(), metadata={"help": "Stop string (repeatable); the reply ends before it."})
    presence_penalty: float = field(default=0.0, metadata={"help": "OpenAI's presence penalty (-2..2)."})
    frequency_penalty: float = field(default=0.0, metadata={"help": "OpenAI's frequency penalty (-2..2)."})
    logit_bias: tuple[tuple[int, float], ...] = field(
        default=(), metadata={"help": "ID=BIAS added to that token's logit (repeatable; -100..100)."})
    logprobs: bool = field(default=False, metadata={"help": "Report each token's log-probability."})
    top_logprobs: int = field(default=0, metadata={"help": "Also report the k most likely tokens (0..20)."})
    logits_processors: tuple[LogitsProcessor, ...] = field(default=(), compare=False, metadata={"cli": False})
    adapter: str | None = field(default=None, metadata={"help": "The LoRA adapter to run (export's --adapter NAME)."})

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif self.stop is None or isinstance(self.stop, (list, tuple, set, frozenset)):
            object.__setattr__(self, "stop", tuple(self.stop or ()))
        else:
            raise OptionsError(f"stop must be a string or a list of strings (got {type(self.stop).__name__} "
                               f"{self.stop!r}).", hint="Use e.g. stop=['\\n\\n'] or --stop '\\n\\n'.")
        object.__setattr__(self, "logit_bias", _bias_pairs(self.logit_bias))
        processors = self.logits_processors
        if callable(processors):
            processors = (processors,)
        _check(isinstance(processors, (list, tuple)) and all(callable(p) for p in processors),
               f"logits_processors must be a list of callables (got {processors!r:.80}).",
               "Pass e.g. logits_processors=[my_processor], each called as f(token_ids, scores) -> scores.")
        object.__setattr__(self, "logits_processors", tuple(processors))
        _check(_whole(self.max_new_tokens) and self.max_new_tokens >= 1,
               f"max_new_tokens must be a whole number of at least 1 (got {self.max_new_tokens!r}).",
               "Use e.g. max_new_tokens=64 (--max-new-tokens 64).")
        _check(_whole(self.min_new_tokens) and 0 <= self.min_new_tokens <= self.max_new_tokens,
               f"min_new_tokens must be between 0 and max_new_tokens ({self.max_new_tokens}), "
               f"got {self.min_new_tokens!r}.", "Lower min_new_tokens or raise max_new_tokens.")
        _check(finite_number(self.temperature) and self.temperature >= 0,
               f"temperature must be 0 (greedy) or positive (got {self.temperature!r}).",
               "Use 0 for greedy decoding or e.g. 0.7 to sample.")
        _check(_whole(self.top_k) and self.top_k >= 0,
               f"top_k must be 0 (off) or a positive integer (got {self.top_k!r}).", "Use e.g. --top-k 50.")
        _check(finite_number(self.top_p) and 0 < self.top_p <= 1,
               f"top_p must be in (0, 1] (got {self.top_p!r}).", "Use e.g. --top-p 0.9 (1.0 turns it off).")
        _check(finite_number(self.repetition_penalty) and self.repetition_penalty > 0,
               f"repetition_penalty must be positive (got {self.repetition_penalty!r}).",
               "Use 1.0 (off) or e.g. 1.1.")
        _check(self.seed is None or (_whole(self.seed) and self.seed >= 0),
               f"seed must be a non-negative integer (got {self.seed!r}).", "Use e.g. --seed 0.")
        _check(all(isinstance(s, str) and s for s in self.stop),
               f"stop strings must be non-empty strings (got {list(self.stop)!r}).", "Use e.g. --stop '\\n\\n'.")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(finite_number(value) and abs(value) <= MAX_PENALTY,
                   f"{name} must be a number in -2..2 (got {value!r}).", f"Use e.g. {name}=0.5 (0 is off).")
        _check(isinstance(self.logprobs, bool), f"logprobs must be True or False (got {self.logprobs!r}).",
               "Use logprobs=True.")
        _check(_whole(self.top_logprobs) and 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS,
               f"top_logprobs must be a whole number in 0..{MAX_TOP_LOGPROBS} (got {self.top_logprobs!r}).",
               "Ask for at most 20 alternatives.")
        if self.top_logprobs:
            object.__setattr__(self, "logprobs", True)
        _check(self.adapter is None or (isinstance(self.adapter, str) and bool(self.adapter)),
               f"adapter must be an adapter's name (got {self.adapter!r}).", "Use e.g. adapter='support'.")

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
        # Not dataclasses.asdict: it deep-copies, and a logits processor may hold state (a grammar's).
        values = {f.name: getattr(base, f.name) for f in fields(cls)} if base else {}
        values.update({k: v for k, v in kwargs.items() if v is not None})
        return cls(**values)


def _bias_pairs(value: Any) -> tuple[tuple[int, float], ...]:
    """logit_bias as sorted (id, bias) pairs, from a mapping, pairs, or "ID=BIAS" strings; checked."""
    hint = "Use e.g. logit_bias={50256: -100} (or --logit-bias 50256=-100)."
    if isinstance(value, Mapping):
        items = list(value.items())
    elif isinstance(value, (list, tuple)):
        items = []
        for item in value:
            if isinstance(item, str):
                key, sep, bias = item.partition("=")
                try:
                    items.append((int(key), float(bias)) if sep else (item, None))
                except ValueError:
                    items.append((item, None))
            elif isinstance(item, (list, tuple)) and len(item) == 2:
                items.append((item[0], item[1]))
            else:
                items.append((item, None))
    else:
        raise OptionsError(f"logit_bias must map token ids to numbers (got {type(value).__name__}).", hint=hint)
    pairs: dict[int, float] = {}
    for key, bias in items:
        token = int(key) if isinstance(key, str) and key.strip().isdigit() else key
        _check(_whole(token) and token >= 0 and finite_number(bias) and abs(bias) <= MAX_BIAS,
               f"logit_bias takes token ids >= 0 with biases in -100..100 (got {key!r}: {bias!r}).", hint)
        pairs[int(token)] = float(bias)
    return tuple(sorted(pairs.items()))


def _whole(value: Any) -> bool:
    # bool is an int subclass, but max_new_tokens=True is a mistake, not 1
    # numpy registers its integer types as numbers.Integral: they count, without importing numpy here
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def finite_number(value: Any) -> bool:
    """Whether `value` is a finite int or float (not a bool: True is a mistake, not 1)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check(ok: bool, message: str, hint: str) -> None:
    if not ok:
        raise OptionsError(message, hint=hint)
