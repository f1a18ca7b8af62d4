"""The next-token choice (numpy), in transformers' order and semantics (the options: runtime/options.py).

Order, as in `GenerationMixin`: repetition penalty, then min_new_tokens (EOS suppressed), then —
only when sampling — temperature, top-k, top-p, and a draw from the softmax. Greedy is argmax.
Both backends use this sampler, so a seeded sampled run gives the same tokens on either.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from phi_onnx.runtime.errors import NonFiniteLogitsError
from phi_onnx.runtime.options import DEFAULT_MAX_NEW_TOKENS, GenerationOptions

__all__ = ["DEFAULT_MAX_NEW_TOKENS", "GenerationOptions", "Sampler"]


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
        if not np.isfinite(scores).all() and (np.isnan(scores).any() or np.isposinf(scores).any()
                                              or np.isneginf(scores).all(axis=-1).any()):
            # argmax of NaNs is 0, so without this a broken model "generates" token 0 forever;
            # -inf alone is a mask (some ids are never chosen), but not on every id
            raise NonFiniteLogitsError(
                f"The model computed non-finite logits (NaN or infinity) for generated token {generated + 1}; "
                "its weights are corrupt or overflow.",
                hint="Check the export (`phi-onnx verify FOLDER`) or export it again with --overwrite.")
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
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            scaled = scores / np.float32(opts.temperature)
        if not np.isfinite(scaled[np.isfinite(scores)]).all():
            # A temperature so small (1e-300 is 0 in float32) that logits / temperature overflows:
            # the softmax is then a point mass on the largest logit, i.e. greedy.
            return int(np.argmax(scores))
        scores = scaled
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
