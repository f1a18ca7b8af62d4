"""Where a token is chosen: one sequence's next token from its logits (numpy).

Order, as in transformers' `GenerationMixin` with OpenAI's knobs added where vLLM adds them:
repetition penalty, presence/frequency penalties, logit bias, the request's logits processors
(grammars plug in there), min_new_tokens (EOS suppressed), then — only when sampling —
temperature, top-k, top-p, and a draw from the softmax. Greedy is argmax. Log-probabilities are
those of the model's own distribution (before any of this), as OpenAI reports them.

Every backend and both drivers (`Model` and the `Scheduler`) use this sampler, one per sequence,
each with its own random generator: a seeded sequence gets the same tokens alone, in a static
batch, in the server, on either backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from phi_onnx.runtime.errors import NonFiniteLogitsError, OptionsError
from phi_onnx.runtime.options import DEFAULT_MAX_NEW_TOKENS, GenerationOptions

__all__ = ["DEFAULT_MAX_NEW_TOKENS", "Choice", "GenerationOptions", "Sampler"]


@dataclass(frozen=True)
class Choice:
    """A chosen token, with its log-probability and the top alternatives when the options ask for them."""

    token: int
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] = ()


class Sampler:
    """Chooses one sequence's tokens. `prompt` seeds the repetition penalty's set of seen ids."""

    def __init__(self, options: GenerationOptions, eos_token_ids: Sequence[int], prompt: Sequence[int],
                 vocab_size: int) -> None:
        self.options = options
        self.vocab = vocab_size
        self.eos = np.asarray(sorted(t for t in set(eos_token_ids) if t < vocab_size), dtype=np.int64)
        self.rng = np.random.default_rng(options.seed)
        self.seen: np.ndarray | None = None
        if options.repetition_penalty != 1.0:
            self.seen = np.zeros(vocab_size, dtype=bool)
            self.seen[np.asarray(prompt, dtype=np.int64)] = True
        self.counts: np.ndarray | None = None
        if options.presence_penalty or options.frequency_penalty:
            self.counts = np.zeros(vocab_size, dtype=np.float32)
        self.bias: tuple[np.ndarray, np.ndarray] | None = None
        if options.logit_bias:
            ids = np.array([t for t, _ in options.logit_bias], dtype=np.int64)
            if ids.max() >= vocab_size:
                raise OptionsError(f"logit_bias names token {int(ids.max())}, outside the vocabulary "
                                   f"(0..{vocab_size - 1}).", hint="Use token ids of this model's tokenizer.")
            self.bias = ids, np.array([b for _, b in options.logit_bias], dtype=np.float32)

    def __call__(self, logits: np.ndarray, tokens: list[int], generated: int) -> Choice:
        """The next token from `logits` [vocab]; `tokens` is the sequence so far (prompt and generated),
        `generated` how many of them were generated."""
        opts = self.options
        scores = np.array(logits, dtype=np.float32)  # a copy: the engine may reuse its buffer
        if not np.isfinite(scores).all() and (np.isnan(scores).any() or np.isposinf(scores).any()
                                              or np.isneginf(scores).all()):
            # argmax of NaNs is 0, so without this a broken model "generates" token 0 forever;
            # -inf alone is a mask (some ids are never chosen), but not on every id
            raise NonFiniteLogitsError(
                f"The model computed non-finite logits (NaN or infinity) for generated token {generated + 1}; "
                "its weights are corrupt or overflow.",
                hint="Check the export (`phi-onnx verify FOLDER`) or export it again with --overwrite.")
        if self.seen is not None:
            penalty = np.float32(opts.repetition_penalty)
            hit = scores[self.seen]
            scores[self.seen] = np.where(hit < 0, hit * penalty, hit / penalty)
        if self.counts is not None:
            scores -= np.float32(opts.frequency_penalty) * self.counts + \
                np.float32(opts.presence_penalty) * (self.counts > 0)
        if self.bias is not None:
            scores[self.bias[0]] += self.bias[1]
        for processor in opts.logits_processors:
            scores = processor(tokens, scores)
        if generated < opts.min_new_tokens and self.eos.size:
            scores[self.eos] = -np.inf
        if not np.isfinite(scores).any():
            raise OptionsError("Every token was ruled out (by logit_bias, a logits processor or min_new_tokens).",
                               hint="Loosen the constraint so that at least one token stays possible.")
        token = int(np.argmax(scores)) if not opts.do_sample else self._draw(scores)
        return self._observe(token, logits)

    def take(self, token: int) -> Choice:
        """Record `token` as chosen without logits: a token the grammar forces (a fast-forward; never with
        `logprobs`, which need each token's logits). The penalties count it as if it had been sampled."""
        if self.options.do_sample:
            # A mask that allows one token still costs one draw: later draws stay those of token-by-token decoding.
            self.rng.random()
        self._count(token)
        return Choice(token)

    def _count(self, token: int) -> None:
        if self.seen is not None:
            self.seen[token] = True
        if self.counts is not None:
            self.counts[token] += 1

    def _observe(self, token: int, logits: np.ndarray) -> Choice:
        self._count(token)
        if not self.options.logprobs:
            return Choice(token)
        shifted = logits.astype(np.float64) - logits.max()
        logp = shifted - np.log(np.exp(shifted).sum())
        top: tuple[tuple[int, float], ...] = ()
        k = self.options.top_logprobs
        if k:
            best = np.argpartition(-logp, k - 1)[:k]
            best = best[np.argsort(-logp[best], kind="stable")]
            top = tuple((int(t), float(logp[t])) for t in best)
        return Choice(token, float(logp[token]), top)

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
