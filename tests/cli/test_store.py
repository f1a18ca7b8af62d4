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

    def interrupted(path, *args, **kwargs):  # Ctrl-C after the weights went, before model.onnx did
        (Path(path) / "model.onnx.data").unlink()
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr("phi_onnx.store.delete_written", interrupted)
        assert run("rm", "tiny-phi3").exit_code == 130
    leftover = home / "models" / f".removing-{folder.name}"
    assert (leftover / "model.onnx").is_file() and (leftover / ".phi-onnx-removing").is_file()
    again = resolve_model("tiny-phi3", device="cpu")
    assert again == folder and (again / "model.onnx.data").is_file()
    assert run("rm", "tiny-phi3").exit_code == 0  # and finishes the one cut short, from its list
    assert list((home / "models").iterdir()) == []


# -- what the store may delete, damaged entries, names and paths (issue 18) -----------------------------------

def no_traceback(result) -> None:
    assert "Traceback" not in result.output and "Traceback" not in result.stderr


def test_rm_leaves_removing_folders_the_store_did_not_make(home):
    """The issue's repro: a `.removing-*` folder the user made survives `rm`, and so does one named like an id
    whose files no removal list names."""
    notes = home / "models" / ".removing-notes"
    notes.mkdir(parents=True)
    (notes / "n.txt").write_text("mine")
    lookalike = home / "models" / ".removing-0123456789ab"
    lookalike.mkdir()
    (lookalike / "model.onnx").write_text("mine too")  # a name exports use, but no list or manifest names it

    chat = run("chat", "tiny-phi3", "--once", "--max-new-tokens", "2", input="hi\n")
    assert chat.exit_code == 0, chat.output
    removed = run("rm", "tiny-phi3")
    assert removed.exit_code == 0, removed.output
    assert (notes / "n.txt").read_text() == "mine" and (lookalike / "model.onnx").read_text() == "mine too"
    assert sorted(p.name for p in (home / "models").iterdir()) == [".removing-0123456789ab", ".removing-notes"]
    assert list_entries() == []


def test_rm_refuses_an_entry_holding_a_file_it_did_not_write(home):
    folder = resolve_model("tiny-phi3", device="cpu")
    (folder / "notes.txt").write_text("mine")
    before = sorted(p.name for p in folder.iterdir())

    refused = run("rm", "tiny-phi3")
    assert refused.exit_code == 2
    assert "notes.txt, which phi-onnx did not write" in refused.stderr and "nothing was removed" in refused.stderr
    assert f"Move what you need out of {folder}" in refused.stderr and "phi-onnx rm tiny-phi3" in refused.stderr
    no_traceback(refused)
    assert sorted(p.name for p in folder.iterdir()) == before and len(list_entries()) == 1  # all still there

    (folder / "notes.txt").unlink()
    assert run("rm", "tiny-phi3").exit_code == 0 and not folder.exists()


def test_a_finished_rm_list_is_used_and_nothing_else(home, monkeypatch, caplog):
    """An rm cut short after its list was written: the next rm deletes the listed files, keeps anything else."""
    folder = resolve_model("tiny-phi3", device="cpu")

    def interrupted(path, *args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr("phi_onnx.store.delete_written", interrupted)
        assert run("rm", "tiny-phi3").exit_code == 130
    leftover = home / "models" / f".removing-{folder.name}"
    listed = json.loads((leftover / ".phi-onnx-removing").read_text())
    assert listed["id"] == folder.name and {"model.onnx", "model.onnx.data", "phi_onnx.json"} <= set(listed["files"])
    (leftover / "dropped-in.txt").write_text("mine")

    resolve_model("tiny-phi3", device="cpu")
    result = run("rm", "tiny-phi3")
    assert result.exit_code == 0, result.output
    assert any("dropped-in.txt, which phi-onnx did not write" in r.getMessage() for r in caplog.records)  # on stderr
    assert sorted(p.name for p in (home / "models").iterdir()) == [leftover.name]
    assert [p.name for p in leftover.iterdir()] == ["dropped-in.txt"]


def test_a_stale_pending_folder_that_is_not_an_export_is_refused(home):
    from phi_onnx.store import _hash, _version, default_export_options

    options = default_export_options("cpu")
    key = _hash({"stamp": source_stamp(TINY_PHI3_DIR), "options": options.to_dict(), "version": _version()})[:16]
    pending = home / "models" / f".pending-{key}"
    pending.mkdir(parents=True)
    (pending / "n.txt").write_text("mine")

    result = run("generate", "tiny-phi3", "x", "--max-new-tokens", "2", "--device", "cpu")
    assert result.exit_code == 2
    assert str(pending) in result.stderr and "which phi-onnx did not write" in result.stderr
    no_traceback(result)
    assert (pending / "n.txt").read_text() == "mine" and list_entries() == []


@pytest.mark.parametrize(("damage", "why", "listed"), [
    ("manifest", "its phi_onnx.json is missing", True),
    ("weights", "files are missing (model.onnx.data)", True),
    ("record", "it has no record", True),
    # What the runtime finds wrong in a file's content, in the store's words; `list` reads no model file
    ("genai_config", "lacks the required field model.context_length", False),
])
def test_a_damaged_entry_is_listed_refused_and_removable(home, damage, why, listed):
    folder = resolve_model("tiny-phi3", device="cpu")
    entry_id = folder.name
    if damage == "manifest":
        (folder / "phi_onnx.json").unlink()
    elif damage == "weights":
        (folder / "model.onnx.data").unlink()
    elif damage == "genai_config":
        (folder / "genai_config.json").write_text('{"model": {"decoder": {}}}')
    else:
        (home / "entries" / f"{entry_id}.json").unlink()

    used = run("chat", "tiny-phi3" if damage != "record" else entry_id, "--once", input="hi\n")
    assert used.exit_code == 2, used.output
    assert f"The store entry {entry_id}" in used.stderr and "is damaged" in used.stderr and why in used.stderr
    assert f"Remove it with `phi-onnx rm {entry_id}`" in used.stderr and "--overwrite" not in used.stderr
    no_traceback(used)
    assert used.stdout == ""  # never used

    entries = json.loads(run("list", "--json").stdout)
    assert [e["id"] for e in entries] == [entry_id]
    assert entries[0]["damaged"].startswith(why) if listed else entries[0]["damaged"] is None
    table = run("list").stdout
    assert ("DAMAGED" in table and f"`phi-onnx rm {entry_id}` removes it" in table) == listed

    removed = run("rm", entry_id)
    assert removed.exit_code == 0, removed.output
    assert ("damaged: " + why in removed.stdout) == listed
    assert list((home / "models").iterdir()) == [] and list((home / "entries").iterdir()) == []
    assert run("chat", "tiny-phi3", "--once", "--max-new-tokens", "2", input="hi\n").exit_code == 0  # afresh


def test_a_damaged_entry_without_any_file_list_is_not_guessed_at(home):
    """An entry from before records listed their files, with its manifest gone: rm cannot tell what it
    wrote, so it deletes nothing and says how to finish by hand."""
    folder = resolve_model("tiny-phi3", device="cpu")
    record_path = home / "entries" / f"{folder.name}.json"
    record = json.loads(record_path.read_text())
    del record["files"]
    record_path.write_text(json.dumps(record))
    (folder / "phi_onnx.json").unlink()
    before = sorted(p.name for p in folder.iterdir())

    refused = run("rm", "tiny-phi3")
    assert refused.exit_code == 2 and "phi_onnx.json is gone" in refused.stderr
    no_traceback(refused)
    assert sorted(p.name for p in folder.iterdir()) == before and record_path.is_file()
    shutil.rmtree(folder)  # what the message asks the user to do
    assert run("rm", "tiny-phi3").exit_code == 0 and list_entries() == []


def test_a_home_with_an_unknown_user_is_a_clean_error(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PHI_ONNX_HOME", "~nosuchuser-phi-onnx/x")
    for args in (["list"], ["rm", "tiny-phi3"], ["chat", "tiny-phi3", "--once"]):
        result = run(*args, input="hi\n")
        assert result.exit_code == 2, (args, result.output)
        assert "$PHI_ONNX_HOME '~nosuchuser-phi-onnx/x'" in result.stderr
        assert "no user 'nosuchuser-phi-onnx'" in result.stderr and "absolute path" in result.stderr
        no_traceback(result)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setenv("PHI_ONNX_HOME", str(tmp_path / "store"))
    model = run("generate", "~nosuchuser-phi-onnx/model", "x")
    assert model.exit_code == 2 and "no user 'nosuchuser-phi-onnx'" in model.stderr
    no_traceback(model)


def test_a_short_name_means_the_model_even_beside_a_folder_of_that_name(home, tmp_path, monkeypatch, caplog):
    from phi_onnx.source import hub

    monkeypatch.setattr(hub, "_NOTED", set())
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny-phi3").mkdir()
    (tmp_path / "tiny-phi3" / "notes.txt").write_text("mine")

    by_name = run("generate", "tiny-phi3", "def add(a, b):", "--max-new-tokens", "2", "--json")
    assert by_name.exit_code == 0, by_name.output
    notes = [r.getMessage() for r in caplog.records if "short model name" in r.getMessage()]  # on stderr
    assert notes == ["Note: tiny-phi3 is a short model name; using that model, not tiny-phi3 in this folder (pass "
                     "./tiny-phi3 for the folder)."]  # once, though the store and its export both resolve it
    assert [e.name for e in list_entries()] == ["tiny-phi3"]

    by_path = run("generate", "./tiny-phi3", "x", "--max-new-tokens", "2")
    assert by_path.exit_code == 2 and "is not a phi-onnx export" in by_path.stderr
    no_traceback(by_path)
    exported = run("export", "tiny-phi3", "-o", str(tmp_path / "out"))  # export follows the same rule
    assert exported.exit_code == 0, exported.output
    assert json.loads((tmp_path / "out" / "phi_onnx.json").read_text())["source"]["path"] == str(TINY_PHI3_DIR)
    assert [p.name for p in (tmp_path / "tiny-phi3").iterdir()] == ["notes.txt"]


def test_list_escapes_control_characters_and_json_keeps_them(home, tmp_path):
    source = tmp_path / "ckpt-\x1b[2J\x1b[31mred\x07"
    shutil.copytree(TINY_PHI3_DIR, source)
    folder = resolve_model(source, device="cpu")

    table = run("list").stdout
    assert "\x1b" not in table and "\x07" not in table
    assert "ckpt-\\x1b[2J\\x1b[31mred\\x07" in table
    listed = json.loads(run("list", "--json").stdout)
    assert listed[0]["name"] == str(source) and listed[0]["source"] == str(source)
    removed = run("rm", folder.name)
    assert removed.exit_code == 0 and "\x1b" not in removed.stdout and "\\x1b[31m" in removed.stdout
