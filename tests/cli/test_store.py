"""The local store: a name becomes an export once, later runs reuse it, `list` and `rm` manage it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from phi_onnx.cli import main
from phi_onnx.store import list_entries, resolve_model, source_stamp, store_root
from phi_onnx.tiny import TINY_PHI3_DIR


@pytest.fixture()
def home(tmp_path, monkeypatch):
    root = tmp_path / "store"
    monkeypatch.setenv("PHI_ONNX_HOME", str(root))
    return root


def run(*args: str, input: str | bytes | None = None):
    return CliRunner().invoke(main, list(args), input=input, catch_exceptions=False)


def test_chat_by_name_exports_once_then_starts_from_the_store(home, monkeypatch):
    first = run("chat", "tiny-phi3", "--once", "--max-new-tokens", "4", input="What does os.path.join do?\n")
    assert first.exit_code == 0, first.output
    assert "Exporting tiny-phi3" in first.stderr and first.stdout.strip()
    assert store_root() == home

    from phi_onnx.export import pipeline

    def no_export(*args, **kwargs):
        raise AssertionError("the second run must not export again")

    monkeypatch.setattr(pipeline, "export", no_export)
    second = run("chat", "tiny-phi3", "--once", "--max-new-tokens", "4", input="What does os.path.join do?\n")
    assert second.exit_code == 0, second.output
    assert "Exporting" not in second.stderr
    assert second.stdout == first.stdout  # greedy: the same reply from the same entry

    listed = json.loads(run("list", "--json").stdout)
    assert len(listed) == 1
    entry = listed[0]
    assert entry["name"] == "tiny-phi3" and entry["variant"] == "cpu-int4-rtn-block-32"
    assert entry["verified"] is None and entry["size_bytes"] > 0
    assert entry["source"] == str(TINY_PHI3_DIR)
    assert (home / "models" / entry["id"] / "model.onnx").is_file()
    assert not [p for p in (home / "models").iterdir() if p.name.startswith(".")]  # no pending folder left

    table = run("list").stdout.splitlines()
    assert table[0].split() == ["ID", "NAME", "VARIANT", "SIZE", "VERIFIED", "SOURCE"]
    assert table[1].split()[:3] == [entry["id"], "tiny-phi3", "cpu-int4-rtn-block-32"]


def test_options_make_another_entry_and_an_id_runs_it(home):
    fp32 = resolve_model("tiny-phi3", device="cpu", precision="fp32")
    int4 = resolve_model("tiny-phi3", device="cpu")
    assert fp32 != int4
    assert sorted(e.variant for e in list_entries()) == ["cpu-fp32", "cpu-int4-rtn-block-32"]
    assert resolve_model(fp32.name) == fp32  # an entry's id works as MODEL
    result = run("generate", fp32.name, "def join(a, b):", "--max-new-tokens", "3", "--json")
    assert result.exit_code == 0, result.output


def test_an_export_folder_is_used_as_is(home, make_export):
    folder = make_export("phi3-gqa")
    assert resolve_model(folder) == folder
    assert not home.exists()  # nothing written to the store


def test_a_checkpoint_folder_is_keyed_by_stat_then_by_weights(home, tmp_path):
    source = tmp_path / "ckpt"
    shutil.copytree(TINY_PHI3_DIR, source)
    first = resolve_model(source, device="cpu")
    assert resolve_model(source, device="cpu") == first

    # A new stamp with the same bytes (a touched file): exported again, and found to be the same entry.
    stamp = source_stamp(source)
    weights = source / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert source_stamp(source) != stamp
    assert resolve_model(source, device="cpu") == first
    assert len(list_entries()) == 1

    # Different weights: a new entry.
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    changed = resolve_model(source, device="cpu")
    assert changed != first and len(list_entries()) == 2


def test_concurrent_first_runs_make_one_entry(home):
    code = "from phi_onnx.store import resolve_model; print(resolve_model('tiny-phi3', device='cpu'))"
    env = {**os.environ, "PHI_ONNX_HOME": str(home)}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outputs = [proc.communicate(timeout=120) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    folders = {out.strip() for out, _ in outputs}
    assert len(folders) == 1 and len(list_entries()) == 1
    assert sorted(p.name for p in (home / "models").iterdir()) == [list_entries()[0].id]


def test_rm_removes_store_entries_only(home, tmp_path):
    folder = resolve_model("tiny-phi3", device="cpu")
    foreign = home / "models" / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not phi-onnx's")

    missing = run("rm", "mine")
    assert missing.exit_code == 2 and "No store entry" in missing.stderr and "Traceback" not in missing.output
    assert (foreign / "notes.txt").is_file()

    removed = run("rm", "tiny-phi3")
    assert removed.exit_code == 0, removed.output
    assert folder.name in removed.stdout and not folder.exists()
    assert list_entries() == [] and (foreign / "notes.txt").is_file()
    assert "empty" in run("list").stdout


def test_rm_by_id_prefix(home):
    folder = resolve_model("tiny-phi3", device="cpu")
    result = run("rm", folder.name[:6])
    assert result.exit_code == 0, result.output
    assert not folder.exists()


def test_unknown_name_is_a_clean_error(home):
    result = run("chat", "no-such-model", "--once", input="hi\n")
    assert result.exit_code == 2
    assert "Unknown model 'no-such-model'" in result.stderr and "Traceback" not in result.output


def test_cli_errors_do_not_show_the_python_spelling(home, tmp_path):
    out = tmp_path / "out"
    assert run("export", "tiny-phi3", "-o", str(out)).exit_code == 0
    again = run("export", "tiny-phi3", "-o", str(out))
    assert again.exit_code == 2 and "--overwrite" in again.stderr
    assert "overwrite=True" not in again.stderr


def test_paths_that_are_not_checkpoints_go_to_the_runtime_unchanged(home, tmp_path):
    missing, empty = tmp_path / "missing", tmp_path / "empty"
    empty.mkdir()
    assert resolve_model(missing) == missing and resolve_model(empty) == empty
    result = run("chat", str(empty), "--once", input="hi\n")
    assert result.exit_code == 2 and "not a phi-onnx export" in result.stderr
    assert not home.exists()


def test_precision_with_an_export_folder_says_it_is_not_used(home, make_export):
    result = run("generate", str(make_export("phi3-gqa")), "x", "--precision", "fp32", "--max-new-tokens", "2")
    assert result.exit_code == 0, result.output
    assert "--precision applies when MODEL is a name" in result.stderr


def test_an_rm_cut_short_leaves_no_half_entry_for_the_next_export(home, monkeypatch):
    folder = resolve_model("tiny-phi3", device="cpu")
    real_rmtree = shutil.rmtree

    def interrupted(path, *args, **kwargs):  # Ctrl-C after the weights went, before model.onnx did
        (Path(path) / "model.onnx.data").unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr("phi_onnx.store.shutil.rmtree", interrupted)
    assert run("rm", "tiny-phi3").exit_code == 130
    monkeypatch.setattr("phi_onnx.store.shutil.rmtree", real_rmtree)
    again = resolve_model("tiny-phi3", device="cpu")
    assert again == folder and (again / "model.onnx.data").is_file()
    run("rm", "tiny-phi3")
    assert list((home / "models").iterdir()) == []
