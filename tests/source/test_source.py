"""Source resolution: folders, short names, hub ids through the local cache (offline)."""

from __future__ import annotations

import pytest

from phi_onnx.errors import SourceError
from phi_onnx.source.hub import resolve_source
from phi_onnx.source.models import KNOWN_MODELS, find_known_model


def fake_cache(root, repo_id: str, files: dict[str, str]):
    """Lay out a Hugging Face hub cache entry the way huggingface_hub writes one."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for name, text in files.items():
        (snapshot / name).write_text(text)
    return snapshot


def test_short_name_resolves_through_the_local_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    snapshot = fake_cache(tmp_path, "microsoft/Phi-4-mini-instruct", {"config.json": "{}"})
    resolved = resolve_source("phi-4-mini", offline=True)
    assert resolved.path == snapshot
    assert resolved.hub_id == "microsoft/Phi-4-mini-instruct"


def test_hub_id_not_cached_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(SourceError, match="not in the local Hugging Face cache"):
        resolve_source("someone/some-phi", offline=True)


def test_local_folder_and_missing_folder(tmp_path):
    assert resolve_source(str(tmp_path)).path == tmp_path.resolve()
    with pytest.raises(SourceError, match="does not exist"):
        resolve_source(str(tmp_path / "nope"))
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(SourceError, match="is a file"):
        resolve_source(str(tmp_path / "file.txt"))


def test_aliases_and_table():
    assert find_known_model("Phi-3-Mini").name == "phi-3-mini-4k"
    names = {m.name for m in KNOWN_MODELS}
    for required in ("phi-2", "phi-3-mini-128k", "phi-3-small-8k", "phi-3-small-128k", "phi-3-medium-4k",
                     "phi-3-medium-128k", "phi-3.5-mini", "phi-3.5-moe", "phi-4", "phi-4-mini",
                     "phi-4-mini-reasoning", "phi-4-reasoning"):
        assert required in names
