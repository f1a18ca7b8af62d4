"""Resolve what the user named (short name, hub id, local folder) to a local checkpoint folder."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from phi_onnx.errors import SourceError
from phi_onnx.source.models import find_known_model, known_names

log = logging.getLogger(__name__)

#: Tokenizer, chat template and generation settings: what an export copies next to its model.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
# Only data files: weights as safetensors, configs, tokenizer. Never pickles, never Python code.
HUB_ALLOW_PATTERNS = [
    "*.safetensors",
    "*.safetensors.index.json",
    "config.json",
    *TOKENIZER_FILES,
    "vocab.json",
    "merges.txt",
    "cl100k_base.tiktoken",  # Phi-3-small's tokenizer ranks, converted to tokenizer.json on export
]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_NOTED: set[str] = set()  #: short names already noted as shadowing a folder of the same name


@dataclass(frozen=True)
class ResolvedSource:
    """A checkpoint available on local disk, and how it was named."""

    spec: str
    path: Path
    hub_id: str | None = None
    revision: str | None = None


def resolve_source(spec: str, *, revision: str | None = None, offline: bool = False) -> ResolvedSource:
    """Turn a short name, hub id or folder into a local checkpoint folder, downloading if needed.

    Raises:
        SourceError: the name is unknown, the folder does not exist, or the hub cannot be reached.
    """
    from phi_onnx.paths import expand_user

    path = expand_user(spec, what="The checkpoint path", error=SourceError)
    known = find_known_model(spec)
    if known is not None and os.path.lexists(path) and spec not in _NOTED:
        # A short name means that model wherever it runs; a folder is reached by a path (`./NAME`)
        _NOTED.add(spec)  # once per process: the store and the export it starts both resolve the name
        log.warning("Note: %s is a short model name; using that model, not %s in this folder (pass ./%s for "
                    "the folder).", spec, spec, spec)
    if path.is_dir() and known is None:
        return ResolvedSource(spec=spec, path=path.resolve())
    if known is not None and known.name == "tiny-phi3":
        from phi_onnx.tiny import TINY_PHI3_DIR

        return ResolvedSource(spec=spec, path=TINY_PHI3_DIR)
    if known is not None:
        return _from_hub(spec, known.hub_id, revision=revision, offline=offline)
    if _HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        return _from_hub(spec, spec, revision=revision, offline=offline)
    if path.exists():
        raise SourceError(f"{spec!r} is a file, not a checkpoint folder.",
                          hint="Pass the folder that holds config.json and the *.safetensors files.")
    if any(sep in spec for sep in ("/", "\\")) or spec.startswith((".", "~")):
        raise SourceError(f"Checkpoint folder {spec!r} does not exist.",
                          hint="Check the path, or pass a short name (see `phi-onnx models`).")
    raise SourceError(
        f"Unknown model {spec!r}.",
        hint="Known short names: " + ", ".join(known_names())
        + ". You can also pass a Hugging Face hub id (owner/name) or a local folder.",
    )


def _from_hub(spec: str, hub_id: str, *, revision: str | None, offline: bool) -> ResolvedSource:
    """Find the checkpoint in the local Hugging Face cache, else download its data files."""
    from huggingface_hub import snapshot_download

    # huggingface_hub reads HF_HUB_CACHE when imported; read it per call so it can change later.
    cache_dir = os.environ.get("HF_HUB_CACHE") or None
    try:
        folder = snapshot_download(hub_id, revision=revision, allow_patterns=HUB_ALLOW_PATTERNS,
                                   local_files_only=True, cache_dir=cache_dir)
        log.info("using cached %s at %s", hub_id, folder)
        return ResolvedSource(spec=spec, path=Path(folder), hub_id=hub_id, revision=revision)
    except Exception as cached_error:
        log.debug("%s not in the local cache: %s", hub_id, cached_error)
    local_hint = (
        f"Download it on a machine with access (`hf download {hub_id} --include '*.safetensors' "
        "'*.json' 'tokenizer*'`) and pass the folder instead: `phi-onnx export ./that-folder ...`."
    )
    if offline:
        raise SourceError(f"{hub_id} is not in the local Hugging Face cache and offline mode is on.",
                          hint=local_hint)
    try:
        folder = snapshot_download(hub_id, revision=revision, allow_patterns=HUB_ALLOW_PATTERNS,
                                   cache_dir=cache_dir)
    except Exception as error:
        reason = _describe_hub_error(error)
        raise SourceError(f"Could not download {hub_id} from the Hugging Face hub: {reason}.",
                          hint=local_hint) from error
    return ResolvedSource(spec=spec, path=Path(folder), hub_id=hub_id, revision=revision)


def _describe_hub_error(error: Exception) -> str:
    name = type(error).__name__
    if name in ("RepositoryNotFoundError", "GatedRepoError"):
        return "the repository does not exist or needs you to log in (`hf auth login`)"
    if name == "RevisionNotFoundError":
        return "that revision does not exist"
    if name in ("LocalEntryNotFoundError", "OfflineModeIsEnabled") or "connect" in str(error).lower():
        return "the network is unreachable (or HF_HUB_OFFLINE is set)"
    return f"{name}: {str(error).splitlines()[0] if str(error) else 'no details'}"
