"""The limits a verification must meet: per precision defaults, with the measurements they were set from."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

from phi_onnx.verify.errors import VerifyError


@dataclass(frozen=True)
class Thresholds:
    """Limits a verification must meet; None means "reported, not checked".

    Attributes:
        max_abs_logit_diff: largest |ONNX - reference| over every logit compared (upper bound).
        top1_agreement: share of positions whose most likely token is the same (lower bound).
        kl_divergence: mean KL(reference || ONNX) per position, in nats (upper bound).
        greedy_agreement: mean share of greedy continuation tokens produced before the first
            disagreement (lower bound).
        perplexity_change: |perplexity_onnx / perplexity_reference - 1| on the text (upper bound).
    """

    max_abs_logit_diff: float | None = None
    top1_agreement: float | None = None
    kl_divergence: float | None = None
    greedy_agreement: float | None = None
    perplexity_change: float | None = None

    def __post_init__(self) -> None:
        for item in fields(self):
            limit = getattr(self, item.name)
            if limit is None:
                continue
            agreement = item.name in LOWER_BOUNDS
            if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not math.isfinite(limit) \
                    or limit < 0 or (agreement and limit > 1):
                # nan would fail (or, as an upper bound's inf, pass) every check whatever was measured
                raise VerifyError(f"The {item.name} limit must be a finite number "
                                  f"{'from 0 to 1' if agreement else 'of at least 0'}, not {limit!r}.",
                                  hint="For example top1_agreement 0.85 (--min-top1 0.85), kl_divergence 0.1.")

    def with_overrides(self, **overrides: float | None) -> Thresholds:
        """A copy with the given (non-None) limits replaced."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def to_dict(self) -> dict[str, float | None]:
        """JSON-friendly form."""
        return asdict(self)


#: Lower-bound figures; every other figure is an upper bound.
LOWER_BOUNDS = frozenset({"top1_agreement", "greedy_agreement"})

#: Default limits per precision, set from measurement: built-in prompts and text (32 greedy tokens per prompt,
#: 1024 text tokens in 256-token windows, ~1230 positions), ONNX Runtime 1.32 CPU against transformers 5.23 fp32
#: CPU. "random" = the five tiny random test checkpoints (phi3-mha, -gqa, phi4mini, -rot24, -window);
#: "tiny-phi3" = the bundled trained model, on the built-in text and on its heldout.txt. Worst value measured:
#:
#:   precision  checkpoints        max|Δlogit|  top-1    KL        greedy  ppl change
#:   fp32       random, tiny-phi3  2.1e-5       1.0      1.2e-12   1.0     5.6e-8
#:   fp16       random, tiny-phi3  8.8e-3       0.9968   2.3e-7    0.875   2.8e-5    (CUDA exports run on CPU ORT)
#:   int4       tiny-phi3          2.1          0.936    0.0065    0.562   0.70 %    (block 32, acc. level 4)
#:   int4       random             0.34         0.70     0.0021    0.047   0.37 %
#:
#: Random weights give near-flat logits, so int4's top-1 and greedy figures there compare noise (0.70 and
#: 0.047 are not failures of the export); the int4 limits are set from the trained model. Every limit leaves
#: room for real Phi models, whose errors grow with width and depth (and, for int4, with activation
#: outliers) and which could not be measured offline; a broken export is far outside them (a corrupted
#: fp32 weight block: max|Δlogit| 1.3, top-1 0.009, KL 0.043). max|Δlogit| is not checked for int4: its scale
#: follows the logits' and says nothing that KL and top-1 do not.
DEFAULT_THRESHOLDS: dict[str, Thresholds] = {
    "fp32": Thresholds(max_abs_logit_diff=1e-2, top1_agreement=0.995, kl_divergence=1e-5, greedy_agreement=0.75,
                       perplexity_change=1e-3),
    "fp16": Thresholds(max_abs_logit_diff=0.5, top1_agreement=0.98, kl_divergence=1e-3, greedy_agreement=0.5,
                       perplexity_change=5e-3),
    "int4": Thresholds(max_abs_logit_diff=None, top1_agreement=0.80, kl_divergence=0.1, greedy_agreement=0.25,
                       perplexity_change=0.1),
}


def default_thresholds(precision: str) -> Thresholds:
    """The documented default limits for an export of `precision` (fp32, fp16 or int4)."""
    try:
        return DEFAULT_THRESHOLDS[precision]
    except KeyError:
        raise VerifyError(f"No default thresholds for precision {precision!r}.",
                          hint=f"Pass every threshold explicitly, or use one of: {', '.join(DEFAULT_THRESHOLDS)}."
                          ) from None


@dataclass(frozen=True)
class Check:
    """One figure against its limit."""

    figure: str
    value: float
    limit: float
    bound: str  # "min" or "max"
    passed: bool


def evaluate(figures: dict[str, float], thresholds: Thresholds) -> list[Check]:
    """Compare `figures` with `thresholds` (NaN never passes)."""
    checks = []
    for item in fields(thresholds):
        limit = getattr(thresholds, item.name)
        if limit is None or item.name not in figures:
            continue
        value = figures[item.name]
        bound = "min" if item.name in LOWER_BOUNDS else "max"
        ok = bool(value >= limit) if bound == "min" else bool(value <= limit)  # False for NaN either way
        checks.append(Check(item.name, value, float(limit), bound, ok))
    return checks
