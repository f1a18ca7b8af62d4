"""verify(): run the export and its transformers reference on the same token ids, and compare them.

The ONNX model runs on ONNX Runtime (CPU unless asked otherwise) with its KV cache, the way the runtime
runs it: each prompt is prefilled, then continued greedily one token at a time. The reference is the source
checkpoint in transformers (fp32, CPU, never remote code), run teacher-forced on exactly the sequences the
ONNX model saw, so every ONNX logit (prefill and cached decode) has a reference logit for the same context.
Perplexity is measured on a text (a built-in sample, or a file) in windows, on both sides.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from phi_onnx.manifest import MANIFEST, record_verification
from phi_onnx.paths import expand_user
from phi_onnx.source.checkpoint import weight_files
from phi_onnx.verify.errors import VerifyError
from phi_onnx.verify.inputs import BUILTIN_PROMPTS, VerifySettings
from phi_onnx.verify.metrics import compare_logits, nll, standard_error
from phi_onnx.verify.report import VerifyResult
from phi_onnx.verify.runners import (
    ExportReference,
    OnnxRunner,
    Reference,
    export_reference_info,
    reference_info,
    require_reference_extra,
    resolve_reference,
)
from phi_onnx.verify.thresholds import DEFAULT_THRESHOLDS, Thresholds, default_thresholds, evaluate

log = logging.getLogger(__name__)


def verify(folder: str | os.PathLike[str], *, reference: str | None = None, revision: str | None = None,
           settings: VerifySettings | None = None, thresholds: Thresholds | None = None,
           threshold_overrides: dict[str, float | None] | None = None, device: str = "cpu", record: bool = True,
           reference_cache: dict[Path, Reference] | None = None,
           against: str | os.PathLike[str] | None = None) -> VerifyResult:
    """Run the export and its transformers reference on the same inputs and compare them.

    Args:
        folder: an export folder (model.onnx, genai_config.json, tokenizer; phi_onnx.json for the defaults).
        reference: the reference checkpoint (short name, hub id or folder); default: the manifest's source.
        revision: hub revision of `reference`.
        against: another export folder to compare with instead of the transformers reference (e.g. the fp32
            export of the same checkpoint, to judge a quantized one: KL, top-1 and perplexity change against
            exactly the graph it was quantized from). Needs neither torch nor transformers.
        settings: prompts, text, token counts (default: the built-in ones).
        thresholds: limits (default: `DEFAULT_THRESHOLDS` for the export's precision).
        threshold_overrides: figure → limit replacing the default (None values are ignored).
        device: where ONNX Runtime runs the export: "cpu" (default), "auto", "cuda" or "cuda:N".
        record: write the result into the folder's manifest (`verification`).
        reference_cache: loaded references by folder, kept between calls (`phi-onnx build` verifies several
            variants of one model against one reference).

    Returns:
        The figures and checks; `result.passed` says whether every limit held.

    Raises:
        VerifyError: torch/transformers missing, reference unusable or incompatible, inputs unreadable.
        PhiOnnxError: the folder is not a usable export.
    """
    from phi_onnx.runtime.folder import read_folder
    from phi_onnx.runtime.tokenizer import TextTokenizer
    from phi_onnx.verify.inspect import graph_precision

    started = time.perf_counter()
    settings = settings or VerifySettings()
    path = expand_user(folder, what="The export folder", error=VerifyError).resolve()
    if against is not None and reference is not None:
        raise VerifyError("Both a reference checkpoint and a reference export (--against) were given.",
                          hint="Pass one of --reference and --against.")
    if against is None:
        require_reference_extra()  # fail before any work when the extra is missing
    model_folder = read_folder(path)
    manifest = model_folder.manifest
    precision = str(((manifest or {}).get("options") or {}).get("precision") or graph_precision(path))
    overrides = {k: v for k, v in (threshold_overrides or {}).items() if v is not None}
    if thresholds is None and precision not in DEFAULT_THRESHOLDS and overrides:
        thresholds = Thresholds()  # a graph phi-onnx did not write: only the limits given are checked
    limits = (thresholds or default_thresholds(precision)).with_overrides(**overrides)
    if against is not None:
        ref_path = Path(against).expanduser().resolve()
        if ref_path == path:
            raise VerifyError(f"{path} cannot be its own reference.",
                              hint="Pass another export of the same checkpoint with --against, e.g. its fp32 export.")
        read_folder(ref_path)  # a clear error for a folder that is not an export, before anything runs
        provenance = export_reference_info(ref_path, manifest)
    else:
        spec, ref_path = resolve_reference(path, manifest, reference, revision)
        weight_files(ref_path)  # a pickle-only reference is refused now, before anything runs
        provenance = reference_info(spec, ref_path, manifest)

    tokenizer = TextTokenizer(path)
    prompts = (list(BUILTIN_PROMPTS) if settings.use_builtin_prompts else []) + list(settings.prompts)
    if not prompts:
        raise VerifyError("No prompts to verify with.", hint="Keep the built-in prompts or pass --prompts FILE.")
    log.info("loading the export %s", path)
    runner = OnnxRunner(path, device)
    ref: Reference | ExportReference | None = None
    if against is not None:
        log.info("loading the reference export %s", ref_path)
        ref = ExportReference(ref_path)
    else:
        ref = reference_cache.get(ref_path) if reference_cache is not None else None
    if ref is None:
        log.info("loading the reference %s", ref_path)
        ref = Reference(ref_path)
        if reference_cache is not None:
            reference_cache[ref_path] = ref

    log.info("comparing %d prompts on both models: prefill, then %d greedy tokens through the cache",
             len(prompts), settings.new_tokens)
    figures, inputs = _measure(runner, ref, tokenizer, prompts, settings, model_folder)
    inputs = {**settings.key(), **inputs}
    result = VerifyResult(folder=path, precision=precision, figures=figures, thresholds=limits,
                          checks=evaluate(figures, limits), reference=provenance, inputs=inputs,
                          device=runner.choice.name, provider=runner.provider,
                          seconds=time.perf_counter() - started)
    if record:
        if manifest is None:
            log.warning("%s has no %s; the verification is not recorded", path, MANIFEST)
        else:
            changed = record_verification(path, result.to_dict())
            if changed is not None:
                result.files_changed_since_export = changed
                result.recorded = True
    return result


def _measure(runner: OnnxRunner, ref: Reference | ExportReference, tokenizer: Any, prompts: list[str],
             settings: VerifySettings, folder: Any) -> tuple[dict[str, float], dict[str, Any]]:
    """Run both models: prompts (prefill + greedy decode with the cache), then the text in windows."""
    threshold = folder.long_context_threshold
    max_abs, top1, kl, greedy = 0.0, [], [], []
    generated_counts = []
    for prompt in prompts:
        ids = tokenizer.encode(prompt)
        if not ids:
            continue
        budget = settings.new_tokens
        if threshold is not None and len(ids) <= threshold < len(ids) + budget:
            # Decoding across LongRoPE's switch needs the runtime's re-prefill, which a teacher-forced
            # reference cannot mirror position for position; stay on one side of it.
            budget = max(1, threshold - len(ids))
        budget = min(budget, folder.context_length - len(ids))
        if budget < 1:
            raise VerifyError(f"A prompt of {len(ids)} tokens leaves no room in the {folder.context_length}-token "
                              "context.", hint="Use shorter prompts.")
        runner.reset()
        logits = [runner(ids)]
        tokens: list[int] = []
        for _ in range(budget):
            tokens.append(int(logits[-1][-1].argmax()))
            if len(tokens) < budget:
                logits.append(runner([tokens[-1]]))
        onnx_logits = np.concatenate(logits)  # positions 0 .. len(ids) + budget - 2
        ref_logits = ref.logits(ids + tokens[:-1])
        stats = compare_logits(onnx_logits, ref_logits)
        max_abs = max(max_abs, stats["max_abs"])
        top1.append(stats["top1"])
        kl.append(stats["kl"])
        # The reference's own greedy token at step i, given the same prefix (identical up to the first
        # disagreement), is its argmax at that position: no second generation needed.
        ref_next = ref_logits[len(ids) - 1:].argmax(-1)
        mismatch = np.flatnonzero(ref_next != np.asarray(tokens))
        greedy.append((int(mismatch[0]) if mismatch.size else budget) / budget)
        generated_counts.append(budget)

    text_ids = tokenizer.encode(settings.text, add_special_tokens=False)[: settings.text_tokens]
    window = min(settings.window, folder.context_length, threshold or folder.context_length)
    windows = len(text_ids) // window
    if windows < 1:
        raise VerifyError(f"The perplexity text has {len(text_ids)} tokens, fewer than one {window}-token window.",
                          hint="Pass a longer text with --text.")
    text = np.asarray(text_ids[: windows * window], dtype=np.int64).reshape(windows, window)
    log.info("perplexity: %d windows of %d tokens of the %s text", windows, window, settings.text_source)
    nll_ref, nll_onnx = [], []
    for row in text:  # window by window: a large vocabulary makes [positions, vocab] float64 arrays big
        runner.reset()
        onnx_logits = runner(row.tolist())
        ref_logits = ref.logits(row.tolist(), memo=True)
        stats = compare_logits(onnx_logits, ref_logits)
        max_abs = max(max_abs, stats["max_abs"])
        top1.append(stats["top1"])
        kl.append(stats["kl"])
        nll_ref.append(nll(ref_logits, row))
        nll_onnx.append(nll(onnx_logits, row))
    ppl_ref, ppl_onnx = float(np.exp(np.mean(nll_ref))), float(np.exp(np.mean(nll_onnx)))
    figures = {
        "max_abs_logit_diff": max_abs,
        "top1_agreement": float(np.concatenate(top1).mean()),
        "kl_divergence": float(np.concatenate(kl).mean()),
        # Standard errors over sequences (prompts and text windows): what a difference between two exports'
        # figures must exceed to mean something.
        "top1_agreement_se": standard_error([t.astype(np.float64) for t in top1]),
        "kl_divergence_se": standard_error(kl),
        "greedy_agreement": float(np.mean(greedy)),
        "perplexity_reference": ppl_ref,
        "perplexity_onnx": ppl_onnx,
        "perplexity_change": abs(ppl_onnx / ppl_ref - 1),
    }
    figures = {k: (float("nan") if not np.isfinite(v) else float(v)) for k, v in figures.items()}
    positions = int(sum(len(t) for t in top1))
    return figures, {"positions": positions, "greedy_tokens": generated_counts,
                     "text_windows": windows, "effective_window": window}
