"""Generation options and the next-token choice (numpy), in transformers' order and semantics.

Order, as in `GenerationMixin`: repetition penalty, then min_new_tokens (EOS suppressed), then —
only when sampling — temperature, top-k, top-p, and a draw from the softmax. Greedy is argmax.
Both backends use this sampler, so a seeded sampled run gives the same tokens on either.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from phi_onnx.errors import OptionsError

DEFAULT_MAX_NEW_TOKENS = 256


@dataclass(frozen=True)
class GenerationOptions:
    """How to pick tokens and when to stop.

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
    min_new_tokens: int = 0
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop or ()))
        _check(isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1,
               f"max_new_tokens must be at least 1 (got {self.max_new_tokens!r}).", "Use e.g. --max-new-tokens 64.")
        _check(isinstance(self.min_new_tokens, int) and 0 <= self.min_new_tokens <= self.max_new_tokens,
               f"min_new_tokens must be between 0 and max_new_tokens ({self.max_new_tokens}), "
               f"got {self.min_new_tokens!r}.", "Lower min_new_tokens or raise max_new_tokens.")
        _check(_finite(self.temperature) and self.temperature >= 0,
               f"temperature must be 0 (greedy) or positive (got {self.temperature!r}).",
               "Use 0 for greedy decoding or e.g. 0.7 to sample.")
        _check(isinstance(self.top_k, int) and self.top_k >= 0,
               f"top_k must be 0 (off) or a positive integer (got {self.top_k!r}).", "Use e.g. --top-k 50.")
        _check(_finite(self.top_p) and 0 < self.top_p <= 1,
               f"top_p must be in (0, 1] (got {self.top_p!r}).", "Use e.g. --top-p 0.9 (1.0 turns it off).")
        _check(_finite(self.repetition_penalty) and self.repetition_penalty > 0,
               f"repetition_penalty must be positive (got {self.repetition_penalty!r}).",
               "Use 1.0 (off) or e.g. 1.1.")
        _check(self.seed is None or (isinstance(self.seed, int) and self.seed >= 0),
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


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check(ok: bool, message: str, hint: str) -> None:
    if not ok:
        raise OptionsError(message, hint=hint)


class Sampler:
    """Chooses the next token of each row from its logits."""

    def __init__(self, options: GenerationOptions, eos_token_ids: Sequence[int], prompts: Sequence[Sequence[int]],
                 vocab_size: int) -> None:
        self.options = options
        self.eos = np.asarray(sorted(set(eos_token_ids)), dtype=np.int64)
        self.rng = np.random.default_rng(options.seed)
        self.seen: np.ndarray | None = None
        if options.repetition_penalty != 1.0:
            self.seen = np.zeros((len(prompts), vocab_size), dtype=bool)
            for row, ids in enumerate(prompts):
                self.seen[row, np.asarray(ids, dtype=np.int64)] = True

    def __call__(self, logits: np.ndarray, generated: int) -> np.ndarray:
        """Next ids [batch] from `logits` [batch, vocab]; `generated` = tokens made so far per row."""
        scores = np.array(logits, dtype=np.float32)  # a copy: the engine may reuse its buffer
        if self.seen is not None:
            penalty = np.float32(self.options.repetition_penalty)
            hit = scores[self.seen[: len(scores)]]
            scores[self.seen[: len(scores)]] = np.where(hit < 0, hit * penalty, hit / penalty)
        if generated < self.options.min_new_tokens and self.eos.size:
            scores[:, self.eos[self.eos < scores.shape[1]]] = -np.inf
        if not self.options.do_sample:
            return np.argmax(scores, axis=-1)
        return np.array([self._draw(row) for row in scores], dtype=np.int64)

    def observe(self, tokens: np.ndarray) -> None:
        """Record the chosen ids so the repetition penalty sees them."""
        if self.seen is not None:
            self.seen[np.arange(len(tokens)), tokens] = True

    def _draw(self, scores: np.ndarray) -> int:
        opts = self.options
        scores = scores / np.float32(opts.temperature)
        if 0 < opts.top_k < scores.size:
            kth = np.partition(scores, -opts.top_k)[-opts.top_k]
            scores = np.where(scores < kth, -np.inf, scores)
        if opts.top_p < 1.0:
            scores = _top_p(scores, opts.top_p)
        finite = scores[np.isfinite(scores)]
        probs = np.exp((scores - finite.max()).astype(np.float64))
        cumulative = np.cumsum(probs)
        return int(min(np.searchsorted(cumulative, self.rng.random() * cumulative[-1], side="right"),
                       scores.size - 1))


def _top_p(scores: np.ndarray, top_p: float) -> np.ndarray:
    """transformers' TopPLogitsWarper: drop the low tail holding at most 1 - top_p of the probability."""
    order = np.argsort(scores, kind="stable")  # ascending
    ordered = scores[order].astype(np.float64)
    probs = np.exp(ordered - ordered[np.isfinite(ordered)].max())
    probs /= probs.sum()
    remove = np.cumsum(probs) <= 1 - top_p
    remove[-1] = False  # keep at least one token
    out = scores.copy()
    out[order[remove]] = -np.inf
    return out
