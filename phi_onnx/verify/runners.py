"""The two sides a verification compares: the export on ONNX Runtime, and its source in transformers.

Why `OnnxRunner` does not reuse the runtime's `OrtEngine` (runtime/ort_backend.py): the engine's API returns
the last position's logits only (its session runs a copy of the graph rewritten with `logits_to_keep`), and its
KV cache is a buffer preallocated to a capacity that a reallocation forgets, while a verification needs the
logits of every position of the prefill and of each cached decode step, from the graph exactly as written. It
does reuse the runtime's folder reading (`read_folder`: shapes, KV dtype) and device resolution.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from phi_onnx.errors import PhiOnnxError
from phi_onnx.manifest import MANIFEST, manifest_path
from phi_onnx.source.checkpoint import file_sha256
from phi_onnx.verify.errors import OnnxRunError, VerifyError

log = logging.getLogger(__name__)

REFERENCE_HINT = 'Install the reference extra: pip install "phi-onnx[reference]" (torch CPU build + transformers).'


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
        from phi_onnx.source.checkpoint import weight_files

        weight_files(path)  # pickles are refused here, before transformers could unpickle them
        torch, transformers = require_reference_extra()
        self.torch = torch
        with contextlib.suppress(AttributeError):  # a progress bar per load is noise in a report
            transformers.utils.logging.disable_progress_bar()
        try:
            # Never trust_remote_code: the reference must be transformers' own implementation.
            self.model = transformers.AutoModelForCausalLM.from_pretrained(
                str(path), dtype=torch.float32, trust_remote_code=False, use_safetensors=True).eval()
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


class ExportReference:
    """Another export of the model (its fp32 export, typically) as the reference: run on ONNX Runtime's CPU
    provider without a cache, so every position's logits come from one prefill. Needs neither torch nor
    transformers, and compares a quantized export with exactly the graph it was quantized from."""

    def __init__(self, folder: Path) -> None:
        self.runner = OnnxRunner(folder, "cpu")
        self._memo: dict[tuple[int, ...], np.ndarray] = {}

    def logits(self, ids: Sequence[int], *, memo: bool = False) -> np.ndarray:
        """Logits [len(ids), vocab] for one sequence from an empty cache (`memo` as `Reference.logits`)."""
        key = tuple(int(i) for i in ids)
        if key in self._memo:
            return self._memo[key]
        self.runner.reset()
        logits = self.runner(list(key))
        if memo:
            self._memo[key] = logits
        return logits


def export_reference_info(folder: Path, manifest: dict[str, Any] | None) -> dict[str, Any]:
    """Where an export used as the reference came from, and whether it was made from the same checkpoint."""
    from phi_onnx.manifest import ManifestError, read_manifest

    try:
        theirs = read_manifest(folder) or {}
    except ManifestError:
        theirs = {}
    their_source = theirs.get("source") if isinstance(theirs.get("source"), dict) else {}
    our_source = (manifest or {}).get("source")
    our_source = our_source if isinstance(our_source, dict) else {}
    options = theirs.get("options") if isinstance(theirs.get("options"), dict) else {}
    same = None
    if their_source.get("weights_sha256") and our_source.get("weights_sha256"):
        same = their_source.get("weights_sha256") == our_source.get("weights_sha256")
        if not same:
            log.warning("The reference export %s was made from another checkpoint than this folder "
                        "(their source weights differ in the manifests).", folder)
    return {"kind": "export", "spec": str(folder), "path": str(folder),
            "precision": options.get("precision"), "variant": theirs.get("variant"),
            "weights_sha256": their_source.get("weights_sha256"), "same_as_source": same}


def resolve_reference(folder: Path, manifest: dict[str, Any] | None, reference: str | None,
                      revision: str | None = None) -> tuple[str, Path]:
    """(spec, local folder) of the reference checkpoint: `reference` if given, else the manifest's source."""
    from phi_onnx.source.hub import resolve_source

    if reference is None:
        source = (manifest or {}).get("source") or {}
        if not isinstance(source, dict) or not source:
            raise VerifyError(f"{folder} has no {MANIFEST} naming its source checkpoint.",
                              hint="Name the reference with --reference (short name, hub id or folder).")
        path = source.get("path")
        if path and Path(path).is_dir():
            return str(source.get("spec") or path), Path(path)
        spec = source.get("hub_id") or source.get("spec")
        if not spec:
            raise VerifyError(f"The source recorded in {manifest_path(folder)} ({path}) is gone.",
                              hint="Name the reference with --reference (short name, hub id or folder).")
        try:
            resolved = resolve_source(str(spec), revision=revision or source.get("revision"))
        except PhiOnnxError as error:
            raise VerifyError(f"The source recorded in {manifest_path(folder)} cannot be found: {error.message}",
                              hint="Name the reference with --reference (short name, hub id or folder).") from error
        return str(source.get("spec") or spec), resolved.path
    resolved = resolve_source(reference, revision=revision)
    return reference, resolved.path


def reference_info(spec: str, path: Path, manifest: dict[str, Any] | None) -> dict[str, Any]:
    """Where the reference came from, and whether it is byte for byte the export's source."""
    from phi_onnx.source.checkpoint import Checkpoint

    source = (manifest or {}).get("source") or {}
    source = source if isinstance(source, dict) else {}  # a damaged manifest: no provenance to compare
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
