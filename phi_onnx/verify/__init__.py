"""Verify an export against its transformers reference: the same token ids through both, compared.

The ONNX model runs on ONNX Runtime (CPU unless asked otherwise) with its KV cache, the way the runtime
runs it: each prompt is prefilled, then continued greedily one token at a time. The reference is the source
checkpoint in transformers (fp32, CPU, never remote code), run teacher-forced on exactly the sequences the
ONNX model saw, so every ONNX logit (prefill and cached decode) has a reference logit for the same context.
Perplexity is measured on a text (a built-in sample, or a file) in windows, on both sides.

The record is written into the folder's manifest (`phi_onnx.json`, field `verification`), so every
export carries its own quality record.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import platform
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from phi_onnx.errors import PhiOnnxError
from phi_onnx.source.checkpoint import file_sha256

log = logging.getLogger(__name__)

MANIFEST = "phi_onnx.json"
REFERENCE_HINT = 'Install the reference extra: pip install "phi-onnx[reference]" (torch CPU build + transformers).'

#: Prompts every verification runs (plus any from --prompts): code and prose, short and longer.
BUILTIN_PROMPTS: tuple[str, ...] = (
    "def read_json(path):\n    \"\"\"Return the object stored in the JSON file at path.",
    "The capital of France is",
    "Write a short poem about the sea.",
    "Return a new list containing the items of the iterable in ascending order. A custom key function can be",
)

#: The built-in perplexity text: documentation-style prose, the kind of text every Phi model (and the
#: bundled tiny-phi3, trained on Python docstrings) has seen plenty of. Written for phi-onnx.
SAMPLE_TEXT = """\
Open the file and return a corresponding file object. If the file cannot be opened, an error is raised.
The mode argument is an optional string that specifies the mode in which the file is opened. It defaults
to reading in text mode. Other common values are writing, which truncates the file if it already exists,
and appending, which on some systems means that all writes go to the end of the file regardless of the
current seek position. In text mode, if the encoding is not specified, the encoding used is platform
dependent. For reading and writing raw bytes use binary mode and leave the encoding unspecified.

Return the number of items in a container. The argument may be a sequence such as a string, bytes, tuple,
list or range, or a collection such as a dictionary, set or frozen set. If the object has no length, a
type error is raised. The result is always a non-negative integer.

A dictionary maps hashable keys to arbitrary values. Keys are compared by equality, so numeric values that
compare equal, such as one and one point zero, can be used interchangeably to index the same entry. The
method get returns the value for a key if the key is in the dictionary, else a default value, which itself
defaults to None, so that this method never raises a key error. The method items returns a new view of the
dictionary's items, as pairs of key and value.

Split the string at the first occurrence of the separator, and return a tuple containing the part before
the separator, the separator itself, and the part after the separator. If the separator is not found,
return a tuple containing the string itself, followed by two empty strings.

Sort the list in place, using only less than comparisons between items. Exceptions are not suppressed: if
any comparison operation fails, the entire sort operation will fail, and the list will likely be left in a
partially modified state. The key argument specifies a function of one argument that is used to extract a
comparison key from each list element. The reverse argument is a boolean value; if set to true, the list
elements are sorted as if each comparison were reversed. The sort is guaranteed to be stable: it does not
change the relative order of elements that compare equal, which is helpful for sorting in multiple passes.

Join one or more path segments intelligently. The return value is the concatenation of the path and all
members of the remaining segments, with exactly one directory separator following each non-empty part
except the last. If a segment is an absolute path, all previous segments are thrown away and joining
continues from the absolute path segment.

A thread is a separate flow of execution. This means that your program will have two things happening at
once. Threads share the memory of the process that started them, so they can exchange data without copying
it, but access to shared data must be coordinated, for example with a lock. Acquire the lock before reading
or writing the shared state and release it afterwards; a context manager does both and releases the lock
even when an exception is raised.

Return a string which is the concatenation of the strings in the iterable. A type error will be raised if
there are any values in the iterable that are not strings, including bytes objects. The separator between
elements is the string providing this method.

The logging module defines functions and classes which implement a flexible event logging system for
applications and libraries. Messages are passed to loggers, which are organised in a hierarchy by name.
Each message has a level, such as debug, info, warning, error or critical, and a handler decides where the
message is sent: to a file, to the standard error stream, or over the network.

Create a new temporary directory and return its absolute path name. The directory is readable, writable,
and searchable only by the creating user. The user of this function is responsible for deleting the
temporary directory and its contents when done with it.

Encode the object as a JSON formatted string. If the indent argument is a non-negative integer or a string,
then arrays and objects will be pretty printed with that indent level. If sort keys is true, the output of
dictionaries will be sorted by key, which is useful for regression tests to ensure that serializations can
be compared on a day to day basis.
"""


class VerifyError(PhiOnnxError):
    """Verification cannot run (missing extra, incompatible reference, unreadable inputs)."""


class OnnxRunError(VerifyError):
    """ONNX Runtime cannot load or run the export on the chosen provider (e.g. a CUDA export's kernel that
    the CPU provider lacks)."""


# --------------------------------------------------------------------------- thresholds


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


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Check:
    """One figure against its limit."""

    figure: str
    value: float
    limit: float
    bound: str  # "min" or "max"
    passed: bool


@dataclass
class VerifyResult:
    """What a verification measured, and whether every limit held."""

    folder: Path
    precision: str
    figures: dict[str, float]
    thresholds: Thresholds
    checks: list[Check]
    reference: dict[str, Any]
    inputs: dict[str, Any]
    device: str
    provider: str
    seconds: float
    files_changed_since_export: list[str] = field(default_factory=list)
    recorded: bool = False
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    @property
    def passed(self) -> bool:
        """True when every checked figure is within its limit."""
        return all(check.passed for check in self.checks)

    @property
    def failed(self) -> list[str]:
        """Names of the figures outside their limits."""
        return [check.figure for check in self.checks if not check.passed]

    def to_dict(self) -> dict[str, Any]:
        """The record written into the manifest (and printed by `--json`)."""
        return {
            "passed": self.passed,
            "failed": self.failed,
            "created": self.created,
            "precision": self.precision,
            "figures": self.figures,
            "thresholds": self.thresholds.to_dict(),
            "checks": [asdict(check) for check in self.checks],
            "reference": self.reference,
            "inputs": self.inputs,
            "device": self.device,
            "provider": self.provider,
            "tools": _tool_versions(),
            "seconds": round(self.seconds, 2),
            "files_changed_since_export": self.files_changed_since_export,
        }

    def summary(self) -> str:
        """Human-readable table: each figure, its limit, and the verdict."""
        limits = {check.figure: check for check in self.checks}
        lines = [f"Verified {self.folder} ({self.precision}) on {self.provider} against "
                 f"{self.reference.get('spec') or self.reference.get('path')}:"]
        for name, value in self.figures.items():
            check = limits.get(name)
            if check is None:
                verdict = ""
            else:
                sign = ">=" if check.bound == "min" else "<="
                verdict = f"  (limit {sign} {check.limit:g}: {'ok' if check.passed else 'FAILED'})"
            lines.append(f"  {name:<22} {_format(value):>12}{verdict}")
        if self.files_changed_since_export:
            lines.append("  files changed since export: " + ", ".join(self.files_changed_since_export))
        if self.passed:
            lines.append("PASSED")
        else:
            lines.append("FAILED: " + "; ".join(
                f"{c.figure} {_format(c.value)} {'<' if c.bound == 'min' else '>'} {c.limit:g}"
                for c in self.checks if not c.passed))
        return "\n".join(lines)


def _format(value: float) -> str:
    if value != value:  # NaN
        return "nan"
    return f"{value:.6g}" if abs(value) < 1e4 else f"{value:.4e}"


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


# --------------------------------------------------------------------------- metrics (numpy, float64)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log softmax over the last axis, in float64."""
    x = logits.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def compare_logits(onnx: np.ndarray, reference: np.ndarray) -> dict[str, Any]:
    """Per-position figures for two [positions, vocab] logit arrays: max |Δ|, top-1 matches, KL(ref||onnx)."""
    if onnx.shape != reference.shape:
        raise VerifyError(f"The ONNX model gives logits of shape {onnx.shape}, the reference {reference.shape}.",
                          hint="The reference is not the model this folder was exported from; pass the right "
                               "one with --reference.")
    ref_lp, onnx_lp = log_softmax(reference), log_softmax(onnx)
    diff = np.abs(onnx.astype(np.float64) - reference.astype(np.float64))
    return {
        "max_abs": float(diff.max()) if diff.size else 0.0,
        "top1": onnx.argmax(-1) == reference.argmax(-1),
        "kl": (np.exp(ref_lp) * (ref_lp - onnx_lp)).sum(-1),
    }


def nll(logits: np.ndarray, ids: np.ndarray) -> float:
    """Mean negative log-likelihood (nats) of ids[1:] given logits[:-1], for one [length] window."""
    lp = log_softmax(logits[:-1])
    return float(-np.take_along_axis(lp, ids[1:, None], axis=-1).mean())


# --------------------------------------------------------------------------- the ONNX side


class OnnxRunner:
    """model.onnx in one onnxruntime session, with its KV cache kept between calls (batch 1)."""

    def __init__(self, folder: Path, device: str = "cpu") -> None:
        import onnxruntime as ort

        from phi_onnx.runtime.folder import read_folder
        from phi_onnx.runtime.providers import DeviceChoice, resolve_device

        self.folder = read_folder(folder)
        # On CPU directly: resolve_device would warn that a CUDA export runs slowly, which is expected here.
        self.choice = (DeviceChoice("cpu", reason="device=cpu was requested") if device == "cpu"
                       else resolve_device(device, self.folder.export_device))
        try:
            self.session = ort.InferenceSession(str(self.folder.model_path), providers=self.choice.ort_providers())
        except Exception as error:  # onnxruntime raises its own exception types
            raise OnnxRunError(f"ONNX Runtime could not load {self.folder.model_path}: {error}",
                              hint="The export is damaged or needs ops this onnxruntime lacks; export again "
                                   "with --overwrite, or upgrade onnxruntime.") from error
        self.provider = self.session.get_providers()[0]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.past_names = [i.name for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        self.reset()

    def reset(self) -> None:
        """Forget the cache."""
        self.past: dict[str, np.ndarray] = {}
        self.length = 0

    def __call__(self, ids: Sequence[int]) -> np.ndarray:
        """Run `ids` after the cached tokens; logits [len(ids), vocab] as float32."""
        folder = self.folder
        new = np.asarray(ids, dtype=np.int64)[None]
        feeds: dict[str, np.ndarray] = {
            "input_ids": new, "attention_mask": np.ones((1, self.length + new.shape[1]), np.int64)}
        empty = np.zeros((1, folder.num_kv_heads, 0, folder.head_size), folder.kv_dtype)
        for name in self.past_names:
            feeds[name] = self.past.get(name, empty)
        try:
            results = dict(zip(self.output_names, self.session.run(None, feeds), strict=True))
        except Exception as error:  # e.g. an op without a kernel for this dtype on this provider
            raise OnnxRunError(f"ONNX Runtime failed to run {folder.model_path} on {self.provider}: {error}",
                              hint="Verify on a provider that runs this export (e.g. --device cuda for a CUDA "
                                   "export), or export again.") from error
        self.past = {name.replace("present.", "past_key_values.", 1): value
                     for name, value in results.items() if name.startswith("present.")}
        self.length += new.shape[1]
        return np.asarray(results["logits"][0], dtype=np.float32)


# --------------------------------------------------------------------------- the reference side


def require_reference_extra() -> tuple[Any, Any]:
    """Import (torch, transformers), or raise a VerifyError that says which extra to install."""
    try:
        import torch
        import transformers
    except ImportError as error:
        raise VerifyError(f"Verification runs the transformers reference, which needs torch and transformers "
                          f"({error.name or error} is not installed).", hint=REFERENCE_HINT) from error
    return torch, transformers


class Reference:
    """The source checkpoint in transformers, fp32 on CPU, run teacher-forced."""

    def __init__(self, path: Path) -> None:
        torch, transformers = require_reference_extra()
        self.torch = torch
        with contextlib.suppress(AttributeError):  # a progress bar per load is noise in a report
            transformers.utils.logging.disable_progress_bar()
        try:
            # Never trust_remote_code: the reference must be transformers' own implementation.
            self.model = transformers.AutoModelForCausalLM.from_pretrained(
                str(path), dtype=torch.float32, trust_remote_code=False).eval()
        except Exception as error:  # transformers raises ValueError/OSError/... for unusable checkpoints
            raise VerifyError(f"transformers could not load the reference {path}: {error}",
                              hint="Pass a checkpoint folder (config.json + *.safetensors) whose architecture "
                                   "transformers implements natively, with --reference.") from error

        self._memo: dict[tuple[int, ...], np.ndarray] = {}

    def logits(self, ids: Sequence[int], *, memo: bool = False) -> np.ndarray:
        """Logits [len(ids), vocab] for one sequence, no cache. `memo` keeps the result for the next call
        with the same ids (the text windows, the same for every variant of one model)."""
        key = tuple(int(i) for i in ids)
        if key in self._memo:
            return self._memo[key]
        torch = self.torch
        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([list(key)], dtype=torch.long), use_cache=False)
        logits = out.logits[0].float().numpy()
        if memo:
            self._memo[key] = logits
        return logits


def resolve_reference(folder: Path, manifest: dict[str, Any] | None, reference: str | None,
                      revision: str | None = None) -> tuple[str, Path]:
    """(spec, local folder) of the reference checkpoint: `reference` if given, else the manifest's source."""
    from phi_onnx.source.hub import resolve_source

    if reference is None:
        source = (manifest or {}).get("source") or {}
        if not source:
            raise VerifyError(f"{folder} has no phi_onnx.json naming its source checkpoint.",
                              hint="Name the reference with --reference (short name, hub id or folder).")
        path = source.get("path")
        if path and Path(path).is_dir():
            return str(source.get("spec") or path), Path(path)
        spec = source.get("hub_id") or source.get("spec")
        if not spec:
            raise VerifyError(f"The source recorded in {folder / MANIFEST} ({path}) is gone.",
                              hint="Name the reference with --reference (short name, hub id or folder).")
        try:
            resolved = resolve_source(str(spec), revision=revision or source.get("revision"))
        except PhiOnnxError as error:
            raise VerifyError(f"The source recorded in {folder / MANIFEST} cannot be found: {error.message}",
                              hint="Name the reference with --reference (short name, hub id or folder).") from error
        return str(source.get("spec") or spec), resolved.path
    resolved = resolve_source(reference, revision=revision)
    return reference, resolved.path


# --------------------------------------------------------------------------- inputs


def read_prompts(path: str | os.PathLike[str]) -> list[str]:
    """Prompts from a file: a JSON list of strings (.json), else one prompt per non-empty line."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise VerifyError(f"Cannot read prompts from {file}: {error}.",
                          hint="Pass a UTF-8 text file, one prompt per line.") from error
    if file.suffix == ".json":
        try:
            prompts = json.loads(text)
        except json.JSONDecodeError as error:
            raise VerifyError(f"{file} is not valid JSON ({error}).",
                              hint="Use a JSON list of strings, or a .txt file with one prompt per line.") from error
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise VerifyError(f"{file} must hold a JSON list of strings.",
                              hint="For example: [\"first prompt\", \"second\\nprompt\"].")
        return [p for p in prompts if p.strip()]
    return [line for line in text.splitlines() if line.strip()]


def read_text(path: str | os.PathLike[str]) -> str:
    """The perplexity text from a file."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise VerifyError(f"Cannot read the perplexity text {path}: {error}.",
                          hint="Pass a UTF-8 text file with --text.") from error


# --------------------------------------------------------------------------- verify()


@dataclass(frozen=True)
class VerifySettings:
    """What to run. Defaults: built-in prompts and text, 32 greedy tokens, 1024 text tokens in 256-token windows."""

    prompts: tuple[str, ...] = ()
    prompts_source: str = "builtin"
    use_builtin_prompts: bool = True
    text: str = SAMPLE_TEXT
    text_source: str = "builtin"
    new_tokens: int = 32
    text_tokens: int = 1024
    window: int = 256

    def key(self) -> dict[str, Any]:
        """What identifies these inputs (for the record, and to know whether a record is still current)."""
        prompts = (list(BUILTIN_PROMPTS) if self.use_builtin_prompts else []) + list(self.prompts)
        return {
            "prompts": len(prompts),
            "prompts_source": self.prompts_source,
            "prompts_sha256": hashlib.sha256(json.dumps(prompts).encode()).hexdigest(),
            "text_source": self.text_source,
            "text_sha256": hashlib.sha256(self.text.encode()).hexdigest(),
            "new_tokens": self.new_tokens,
            "text_tokens": self.text_tokens,
            "window": self.window,
        }


def verify(folder: str | os.PathLike[str], *, reference: str | None = None, revision: str | None = None,
           settings: VerifySettings | None = None, thresholds: Thresholds | None = None,
           threshold_overrides: dict[str, float | None] | None = None, device: str = "cpu", record: bool = True,
           reference_cache: dict[Path, Reference] | None = None) -> VerifyResult:
    """Run the export and its transformers reference on the same inputs and compare them.

    Args:
        folder: an export folder (model.onnx, genai_config.json, tokenizer; phi_onnx.json for the defaults).
        reference: the reference checkpoint (short name, hub id or folder); default: the manifest's source.
        revision: hub revision of `reference`.
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
    path = Path(folder).expanduser().resolve()
    require_reference_extra()  # fail before any work when the extra is missing
    model_folder = read_folder(path)
    manifest = model_folder.manifest
    precision = str(((manifest or {}).get("options") or {}).get("precision") or graph_precision(path))
    overrides = {k: v for k, v in (threshold_overrides or {}).items() if v is not None}
    if thresholds is None and precision not in DEFAULT_THRESHOLDS and overrides:
        thresholds = Thresholds()  # a graph phi-onnx did not write: only the limits given are checked
    limits = (thresholds or default_thresholds(precision)).with_overrides(**overrides)
    spec, ref_path = resolve_reference(path, manifest, reference, revision)
    reference_info = _reference_info(spec, ref_path, manifest)

    tokenizer = TextTokenizer(path)
    prompts = (list(BUILTIN_PROMPTS) if settings.use_builtin_prompts else []) + list(settings.prompts)
    if not prompts:
        raise VerifyError("No prompts to verify with.", hint="Keep the built-in prompts or pass --prompts FILE.")
    runner = OnnxRunner(path, device)
    ref = reference_cache.get(ref_path) if reference_cache is not None else None
    if ref is None:
        log.info("loading the reference %s", ref_path)
        ref = Reference(ref_path)
        if reference_cache is not None:
            reference_cache[ref_path] = ref

    figures, inputs = _measure(runner, ref, tokenizer, prompts, settings, model_folder)
    inputs = {**settings.key(), **inputs}
    result = VerifyResult(folder=path, precision=precision, figures=figures, thresholds=limits,
                          checks=evaluate(figures, limits), reference=reference_info, inputs=inputs,
                          device=runner.choice.name, provider=runner.provider,
                          seconds=time.perf_counter() - started)
    if record:
        if manifest is None:
            log.warning("%s has no %s; the verification is not recorded", path, MANIFEST)
        else:
            record_verification(path, result)
    return result


def _measure(runner: OnnxRunner, ref: Reference, tokenizer: Any, prompts: list[str], settings: VerifySettings,
             folder: Any) -> tuple[dict[str, float], dict[str, Any]]:
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
        "greedy_agreement": float(np.mean(greedy)),
        "perplexity_reference": ppl_ref,
        "perplexity_onnx": ppl_onnx,
        "perplexity_change": abs(ppl_onnx / ppl_ref - 1),
    }
    figures = {k: (float("nan") if not np.isfinite(v) else float(v)) for k, v in figures.items()}
    positions = int(sum(len(t) for t in top1))
    return figures, {"positions": positions, "greedy_tokens": generated_counts,
                     "text_windows": windows, "effective_window": window}


def _reference_info(spec: str, path: Path, manifest: dict[str, Any] | None) -> dict[str, Any]:
    """Where the reference came from, and whether it is byte for byte the export's source."""
    from phi_onnx.source.checkpoint import Checkpoint

    source = (manifest or {}).get("source") or {}
    config_sha = file_sha256(path / "config.json") if (path / "config.json").is_file() else None
    try:
        checkpoint = Checkpoint(path)
        stamp = tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in checkpoint.files)
        weights_sha: str | None = _weights_sha256(str(path), stamp)
    except (PhiOnnxError, OSError) as error:  # not a safetensors checkpoint: transformers will say more
        log.debug("cannot hash the reference weights: %s", error)
        weights_sha = None
    same = None
    if source.get("weights_sha256") and weights_sha:
        same = source.get("weights_sha256") == weights_sha and source.get("config_sha256") == config_sha
        if not same:
            log.warning("The reference %s is not the checkpoint this folder was exported from "
                        "(its weights or config differ from the manifest's source).", spec)
    return {"spec": spec, "path": str(path), "config_sha256": config_sha, "weights_sha256": weights_sha,
            "same_as_source": same}


@functools.lru_cache(maxsize=16)
def _weights_sha256(path: str, stamp: tuple[tuple[str, int, int], ...]) -> str:
    """The checkpoint's weights digest, computed once per set of files (`stamp`: names, sizes, mtimes)."""
    from phi_onnx.source.checkpoint import Checkpoint

    return Checkpoint(Path(path)).sha256()


# --------------------------------------------------------------------------- the manifest


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The folder's phi_onnx.json, or None when it has none."""
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise VerifyError(f"{path} is not valid JSON ({error}).",
                          hint="Export again with --overwrite to rewrite it.") from error
    return data if isinstance(data, dict) else None


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """Replace phi_onnx.json atomically (a crash leaves the old one, never half a file)."""
    handle, temp = tempfile.mkstemp(prefix=f".{MANIFEST}.", dir=folder)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(json.dumps(manifest, indent=2) + "\n")
        os.replace(temp, folder / MANIFEST)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def record_verification(folder: Path, result: VerifyResult) -> None:
    """Write `result` into the manifest's `verification`, and bring its file hashes up to date.

    The manifest lists the sha256 of every file; if one changed since the export (someone edited the
    weights), the record names it and the list is updated, so the hashes describe the files this
    verification measured rather than ones that are gone (the export's own list moves to `files_at_export`).
    """
    manifest = read_manifest(folder)
    if manifest is None:
        return
    recorded = manifest.get("files") or {}
    current = {p.name: file_sha256(p) for p in sorted(folder.iterdir())
               if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")}
    # The export's own hashes are kept aside the first time they stop matching, so a later verification
    # still names what changed since the export rather than since the previous verification.
    exported = manifest.get("files_at_export") or recorded
    changed = sorted(name for name in set(exported) | set(current) if exported.get(name) != current.get(name))
    if changed:
        log.warning("Files changed since the export: %s", ", ".join(changed))
        manifest.setdefault("files_at_export", recorded)
    result.files_changed_since_export = changed
    manifest["files"] = current
    manifest["verification"] = result.to_dict()
    write_manifest(folder, manifest)
    result.recorded = True


def _tool_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for dist in ("phi-onnx", "onnxruntime", "onnxruntime-gpu", "torch", "transformers"):
        try:
            found[dist] = version(dist)
        except PackageNotFoundError:
            continue
    return found
