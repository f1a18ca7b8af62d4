"""int4 quality on a trained model (random weights cannot judge it), against onnxruntime-genai's builder.

The bundled tiny-phi3 was trained on Python docstrings; `heldout.txt` is text it never saw.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import OnnxLM, heldout_windows_of, kl_and_top1, window_log_probs

from phi_onnx.export import ExportOptions, export
from phi_onnx.tiny import TINY_PHI3_DIR

WINDOW = 128
WINDOWS = 12
# Measured on the bundled tiny-phi3 against its fp32 export over 12 x 128 held-out tokens, default int4
# (rtn, block 32, int8 embedding, 8-bit LM head, accuracy level 4): top-1 agreement 0.954, perplexity
# +0.22 %, KL(fp32 || int4) 3.37e-3 (SE 0.22e-3 over the 12 windows). The defaults before (int4 embedding,
# 4-bit head): 0.928, +0.54 %, 7.6e-3; onnxruntime-genai's builder: 0.938, +0.44 %.
AGREEMENT_MIN = 0.93
PPL_CHANGE_MAX = 0.01
KL_MAX = 0.006  # about 12 standard errors above the measurement, below the defaults before

# The goals of issue 23, against the builder's int4 (KLD ratio at most, top-1 gain at least), on all of
# heldout.txt (121 windows), paired over windows. The anchor is our export in the builder's layout (rtn,
# block 32, full embedding, 4-bit head), which measured the same as the builder's own export: KLD ratio
# 1.000 (SE 0.000), top-1 +0.03 pt (SE 0.03) (benchmarks/int4_defaults_quality.py phi_onnx/tiny/tiny-phi3;
# the slow test below checks it against the builder itself). Measured there:
#   default                        0.574 (SE 0.011), +2.00 pt (SE 0.18)  (first 40 windows, as tested: 0.571)
#   --algo gptq --block-size 128   0.434 (SE 0.014), +2.62 pt (SE 0.19)
#   --mix auto                     0.332 (SE 0.015), +2.83 pt (SE 0.19)
GOALS: dict[str, tuple[dict[str, object], float, float]] = {
    "default": ({}, 0.75, 0.0),
    "gptq-128": ({"algo": "gptq", "block_size": 128}, 0.6, 0.02),
    "mix": ({"mix": "auto"}, 0.4, 0.0),
}
BUILDERS_LAYOUT = {"algo": "rtn", "block_size": 32, "embeddings": "full", "lm_head_bits": 4}


@pytest.fixture(scope="module")
def heldout_ids() -> np.ndarray:
    rows = heldout_windows_of(TINY_PHI3_DIR, TINY_PHI3_DIR / "heldout.txt", WINDOW)
    assert len(rows) >= WINDOWS
    return rows[:WINDOWS]


def logits_of(folder: Path, windows: np.ndarray) -> np.ndarray:
    lm = OnnxLM(folder)
    out = []
    for row in windows:
        lm.reset()
        out.append(lm(row[None])[0])
    return np.stack(out)  # [windows, WINDOW, vocab]


def perplexity(logits: np.ndarray, windows: np.ndarray) -> float:
    shifted = logits[:, :-1].astype(np.float64)
    log_probs = shifted - np.log(np.exp(shifted - shifted.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - shifted.max(-1, keepdims=True)
    targets = windows[:, 1:]
    nll = -np.take_along_axis(log_probs, targets[..., None], axis=-1).mean()
    return float(np.exp(nll))


def quality(folder: Path, reference: np.ndarray, windows: np.ndarray) -> tuple[float, float]:
    """(top-1 agreement with the fp32 export, perplexity change relative to it)."""
    logits = logits_of(folder, windows)
    agreement = float((logits.argmax(-1) == reference.argmax(-1)).mean())
    base = perplexity(reference, windows)
    return agreement, perplexity(logits, windows) / base - 1


@pytest.fixture(scope="module")
def fp32_logits(tmp_path_factory, heldout_ids) -> np.ndarray:
    out = tmp_path_factory.mktemp("tiny") / "fp32"
    export(TINY_PHI3_DIR, out, ExportOptions(precision="fp32"))
    return logits_of(out, heldout_ids)


def kl_divergence(logits: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """Mean KL(reference || logits) per position, and its standard error over windows (positions within
    a window are correlated, windows are not)."""
    ref, lp = (x.astype(np.float64) - x.max(-1, keepdims=True) for x in (reference, logits))
    ref = ref - np.log(np.exp(ref).sum(-1, keepdims=True))
    lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
    per_window = (np.exp(ref) * (ref - lp)).sum(-1).mean(-1)
    return float(per_window.mean()), float(per_window.std(ddof=1) / np.sqrt(per_window.size))


def test_int4_quality_on_trained_model(tmp_path, fp32_logits, heldout_ids):
    out = tmp_path / "int4"
    export(TINY_PHI3_DIR, out, ExportOptions(precision="int4"))  # the defaults
    agreement, ppl_change = quality(out, fp32_logits, heldout_ids)
    kl, kl_se = kl_divergence(logits_of(out, heldout_ids), fp32_logits)
    print(f"int4 block 32: top-1 {agreement:.4f}, KLD {kl:.2e} (SE {kl_se:.1e}), ppl change {ppl_change:+.4f}")
    assert agreement >= AGREEMENT_MIN
    assert ppl_change <= PPL_CHANGE_MAX
    assert kl <= KL_MAX


@pytest.mark.slow
def test_int4_at_least_as_good_as_genai_builder(tmp_path, fp32_logits, heldout_ids):
    """Same checkpoint, same block size (32), CPU int4: ours is no worse than onnxruntime-genai's builder."""
    pytest.importorskip("onnxruntime_genai")
    theirs = tmp_path / "genai"
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(TINY_PHI3_DIR),
                    "-o", str(theirs), "-p", "int4", "-e", "cpu", "-c", str(tmp_path / "cache")],
                   check=True, capture_output=True)
    ours = tmp_path / "ours"
    # The builder keeps the embedding in fp32 and the head in int4: the same layout, our stand-in for it.
    export(TINY_PHI3_DIR, ours, ExportOptions(precision="int4", **BUILDERS_LAYOUT))  # type: ignore[arg-type]
    our_agreement, our_ppl = quality(ours, fp32_logits, heldout_ids)
    their_agreement, their_ppl = quality(theirs, fp32_logits, heldout_ids)
    print(f"ours: top-1 {our_agreement:.4f}, ppl change {our_ppl:+.4f}; "
          f"genai builder: top-1 {their_agreement:.4f}, ppl change {their_ppl:+.4f}")
    assert our_agreement >= their_agreement - 0.002
    assert our_ppl <= their_ppl + 0.002
    # and the default export against the builder's own: the goals, on the 12 windows, and its size
    default = tmp_path / "default"
    export(TINY_PHI3_DIR, default, ExportOptions())
    rows = heldout_ids
    reference = window_log_probs_of(fp32_logits)
    their_kl, their_top1 = kl_and_top1(reference, window_log_probs(theirs, rows))
    our_kl, our_top1 = kl_and_top1(reference, window_log_probs(default, rows))
    size = (default / "model.onnx.data").stat().st_size / (theirs / "model.onnx.data").stat().st_size
    print(f"default / builder: KLD {our_kl.mean() / their_kl.mean():.3f}, top-1 "
          f"{(our_top1.mean() - their_top1.mean()) * 100:+.2f} pt, model.onnx.data {size:.3f}")
    assert our_kl.mean() <= 0.75 * their_kl.mean()
    assert our_top1.mean() >= their_top1.mean()
    assert size <= 1.07


def window_log_probs_of(logits: np.ndarray) -> np.ndarray:
    """log-softmax in float64 of logits [windows, positions, vocab]."""
    x = logits.astype(np.float64)
    x -= x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.fixture(scope="module")
def judged(tmp_path_factory):
    """`judged(options, windows)` → per-window (KLD, top-1) against the fp32 export over the first `windows`
    128-token windows of heldout.txt (all: 121), cached."""
    root = tmp_path_factory.mktemp("goals")
    rows = heldout_windows_of(TINY_PHI3_DIR, TINY_PHI3_DIR / "heldout.txt", WINDOW)
    export(TINY_PHI3_DIR, root / "fp32", ExportOptions(precision="fp32"))
    cache: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}
    references: dict[int, np.ndarray] = {}
    folders: dict[str, Path] = {}

    def judge(options: dict[str, object], windows: int) -> tuple[np.ndarray, np.ndarray]:
        if windows not in references:
            references[windows] = window_log_probs(root / "fp32", rows[:windows])
        name = repr(sorted(options.items()))
        if name not in folders:
            folders[name] = root / f"v{len(folders)}"
            export(TINY_PHI3_DIR, folders[name], ExportOptions(**options))  # type: ignore[arg-type]
        if (name, windows) not in cache:
            cache[name, windows] = kl_and_top1(references[windows], window_log_probs(folders[name], rows[:windows]))
        return cache[name, windows]

    return judge


@pytest.mark.parametrize("variant", [
    "default", pytest.param("gptq-128", marks=pytest.mark.slow), pytest.param("mix", marks=pytest.mark.slow)])
def test_quality_goals_against_the_builders_int4(judged, variant):
    """Plain `--precision int4`, `--algo gptq --block-size 128` and `--mix auto` against the builder's int4."""
    options, ratio_max, gain_min = GOALS[variant]
    windows = 40 if variant == "default" else 121  # the default's margin allows a fast check
    anchor_kl, anchor_top1 = judged(BUILDERS_LAYOUT, windows)
    kl, top1 = judged(options, windows)
    ratio = kl / anchor_kl.mean()
    ratio_se = float((ratio - anchor_kl / anchor_kl.mean()).std(ddof=1) / np.sqrt(ratio.size))
    gain = top1 - anchor_top1
    print(f"{variant}: KLD / builder {ratio.mean():.3f} (SE {ratio_se:.3f}), top-1 {gain.mean() * 100:+.2f} pt "
          f"(SE {gain.std(ddof=1) / np.sqrt(gain.size) * 100:.2f})")
    assert ratio.mean() <= ratio_max
    assert gain.mean() >= gain_min
