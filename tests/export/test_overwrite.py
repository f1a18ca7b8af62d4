"""--overwrite replaces only a previous phi-onnx export, and the final move replaces nothing it did not check.

Each test says what is on disk afterwards: the user's files byte for byte, no staging folder left.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from phi_onnx.cli import main
from phi_onnx.errors import OutputExistsError
from phi_onnx.export import ExportOptions, export
from phi_onnx.export import output as output_module

FP32 = ExportOptions(precision="fp32")
#: Another export of the same checkpoint, told apart by its manifest (fp32 keeps the tests independent of int4).
OTHER = ExportOptions(precision="fp32", max_length=64)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (relative path → bytes): what must survive a refused overwrite."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def hidden_leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.fixture
def ckpt(tmp_path, make_checkpoint) -> Path:
    folder = tmp_path / "work" / "ckpt"
    shutil.copytree(make_checkpoint("phi3-mha"), folder)
    return folder


def assert_refused(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


def test_overwrite_never_replaces_the_source(ckpt):
    before = snapshot(ckpt)
    result = CliRunner().invoke(main, ["export", str(ckpt), "-o", str(ckpt), "--overwrite", "--precision", "fp32"])
    assert_refused(result, "Refusing to overwrite", "is the source checkpoint")
    assert snapshot(ckpt) == before
    assert hidden_leftovers(ckpt.parent) == []


def test_overwrite_never_replaces_a_folder_holding_the_source(ckpt):
    work = ckpt.parent
    (work / "notes.txt").write_text("mine")
    before = snapshot(work)
    result = CliRunner().invoke(main, ["export", str(ckpt), "-o", str(work), "--overwrite"])
    assert_refused(result, "Refusing to overwrite", "holds the source checkpoint")
    assert snapshot(work) == before


def test_overwrite_never_replaces_the_source_through_a_symlink(ckpt):
    link = ckpt.parent / "link"
    link.symlink_to(ckpt, target_is_directory=True)
    before = snapshot(ckpt)
    with pytest.raises(OutputExistsError, match="is the source checkpoint"):
        export(ckpt, link, FP32, overwrite=True)
    assert snapshot(ckpt) == before and link.is_symlink()


def test_overwrite_never_replaces_the_working_directory(ckpt, tmp_path, monkeypatch):
    here = tmp_path / "here"
    here.mkdir()
    (here / "thesis.tex").write_text("years of work")
    monkeypatch.chdir(here)
    result = CliRunner().invoke(main, ["export", str(ckpt), "-o", ".", "--overwrite"])
    assert_refused(result, "is the current directory")
    assert snapshot(here) == {"thesis.tex": b"years of work"}
    result = CliRunner().invoke(main, ["export", str(ckpt), "-o", "..", "--overwrite"])
    assert_refused(result, "Refusing to overwrite", "it holds")  # the source, or the working directory
    assert (here / "thesis.tex").is_file()


@pytest.mark.parametrize("content", ["files", "fake-manifest", "bad-manifest", "export-plus-file", "export-plus-dir"])
def test_overwrite_refuses_folders_that_are_not_only_an_export(content, ckpt, tmp_path):
    out = tmp_path / "out"
    if content.startswith("export"):
        export(ckpt, out, FP32)
        extra = out / ("mine.txt" if content == "export-plus-file" else "mine")
        if content == "export-plus-dir":
            extra.mkdir()
            extra = extra / "deep.txt"
        extra.write_text("mine")
    else:
        out.mkdir()
        (out / "a.txt").write_text("mine")
        if content == "fake-manifest":  # JSON, but not what phi-onnx writes
            (out / "phi_onnx.json").write_text(json.dumps({"files": {"a.txt": "0"}}))
        elif content == "bad-manifest":
            (out / "phi_onnx.json").write_text("{not json")
    before = snapshot(out)
    result = CliRunner().invoke(main, ["export", str(ckpt), "-o", str(out), "--overwrite"])
    reason = {"files": "not a phi-onnx export", "fake-manifest": "not a phi-onnx export",
              "bad-manifest": "is unreadable", "export-plus-file": "holds mine.txt",
              "export-plus-dir": "holds mine/"}[content]
    assert_refused(result, "Refusing to overwrite", reason)
    assert snapshot(out) == before
    assert hidden_leftovers(tmp_path) == []


def test_overwrite_replaces_a_previous_export_and_nothing_else(ckpt, tmp_path):
    out = tmp_path / "out"
    export(ckpt, out, FP32)
    old_manifest = json.loads((out / "phi_onnx.json").read_text())
    export(ckpt, out, OTHER, overwrite=True)
    manifest = json.loads((out / "phi_onnx.json").read_text())
    assert manifest["options"]["max_length"] == 64 != old_manifest["options"]["max_length"]
    assert sorted(p.name for p in out.iterdir()) == sorted([*manifest["files"], "phi_onnx.json"])
    assert hidden_leftovers(tmp_path) == []


def _during_move(monkeypatch, action) -> None:
    """Run `action(target)` just before the final move, as another process might."""
    real = output_module.move_into_place

    def move(staging, target, checked, protected=()):
        action(target)
        return real(staging, target, checked, protected)

    monkeypatch.setattr(output_module, "move_into_place", move)  # what staged_output calls


def test_folder_created_while_exporting_is_left_alone(ckpt, tmp_path, monkeypatch):
    out = tmp_path / "out"

    def user_creates(target: Path) -> None:
        target.mkdir()
        (target / "mine.txt").write_text("mine")

    _during_move(monkeypatch, user_creates)
    with pytest.raises(OutputExistsError, match="appeared while this export ran"):
        export(ckpt, out, FP32)
    assert snapshot(out) == {"mine.txt": b"mine"}
    assert hidden_leftovers(tmp_path) == []


def test_empty_folder_created_while_exporting_is_not_replaced(ckpt, tmp_path, monkeypatch):
    """rename() onto an empty folder would succeed silently on POSIX; the move checks first."""
    out = tmp_path / "out"
    _during_move(monkeypatch, lambda target: target.mkdir())
    with pytest.raises(OutputExistsError, match="appeared"):
        export(ckpt, out, FP32)
    assert out.is_dir() and list(out.iterdir()) == []


def test_export_changed_while_overwriting_is_left_alone(ckpt, tmp_path, monkeypatch):
    out = tmp_path / "out"
    export(ckpt, out, FP32)
    before = snapshot(out)
    _during_move(monkeypatch, lambda target: (target / "mine.txt").write_text("mine"))
    with pytest.raises(OutputExistsError, match="changed while this export ran"):
        export(ckpt, out, OTHER, overwrite=True)
    assert snapshot(out) == {**before, "mine.txt": b"mine"}
    assert hidden_leftovers(tmp_path) == []


@pytest.mark.parametrize("overwrite", [False, True])
def test_two_concurrent_exports_one_wins(overwrite, ckpt, tmp_path, monkeypatch):
    """Both finish their staging folder before either moves: exactly one lands, the other fails cleanly."""
    out = tmp_path / "out"
    if overwrite:
        export(ckpt, out, FP32)
    barrier = threading.Barrier(2, timeout=30)
    _during_move(monkeypatch, lambda target: barrier.wait())
    outcomes: list[object] = []

    def run(options: ExportOptions) -> None:
        try:
            outcomes.append(export(ckpt, out, options, overwrite=overwrite))
        except OutputExistsError as error:
            outcomes.append(error)

    threads = [threading.Thread(target=run, args=(o,)) for o in (ExportOptions(precision="fp32", max_length=32),
                                                                 ExportOptions(precision="fp32", max_length=48))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    errors = [o for o in outcomes if isinstance(o, OutputExistsError)]
    winners = [o for o in outcomes if not isinstance(o, OutputExistsError)]
    assert len(winners) == 1 and len(errors) == 1, outcomes
    assert "while this export ran" in str(errors[0])
    manifest = json.loads((out / "phi_onnx.json").read_text())
    assert manifest["options"]["max_length"] == winners[0].options.max_length  # type: ignore[attr-defined]
    assert sorted(p.name for p in out.iterdir()) == sorted([*manifest["files"], "phi_onnx.json"])
    assert hidden_leftovers(tmp_path) == []


def test_two_export_processes_to_one_folder(ckpt, tmp_path):
    """Two real processes, no coordination: exactly one exits 0, the other 2 with a sentence."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "phi_onnx", "export", str(ckpt), "-o", str(out), "--precision", "fp32"]
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(proc.wait(timeout=300), proc.stderr.read()) for proc in procs if proc.stderr]
    assert sorted(code for code, _ in results) == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert loser.startswith("Error: Output folder") and "Traceback" not in loser
    assert (out / "model.onnx").is_file()
    assert hidden_leftovers(tmp_path) == []


# --------------------------------------------------------------------------- stale staging folders


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _fake_staging(parent: Path, name: str, owner: dict | None) -> Path:
    folder = parent / name
    folder.mkdir()
    (folder / "model.onnx.data").write_bytes(b"\0" * 1000)
    if owner is not None:
        (folder / output_module.MARKER).write_text(json.dumps(owner))
    return folder


def test_stale_staging_of_dead_processes_is_removed(ckpt, tmp_path):
    host = output_module.socket.gethostname()
    me = output_module._this_process()
    dead = _fake_staging(tmp_path, ".out.deadbeef.partial", {"pid": _dead_pid(), "start": "1", "host": host})
    reused = _fake_staging(tmp_path, ".out.reused00.partial", {"pid": os.getpid(), "start": "-1", "host": host})
    live = _fake_staging(tmp_path, ".out.live0000.partial", me)
    unmarked = _fake_staging(tmp_path, ".out.mine0000.partial", None)
    other_host = _fake_staging(tmp_path, ".out.remote00.partial", {"pid": _dead_pid(), "host": "elsewhere"})
    other_target = _fake_staging(tmp_path, ".other.dead0000.partial", {"pid": _dead_pid(), "host": host})
    export(ckpt, tmp_path / "out", FP32)
    assert not dead.exists() and not reused.exists()  # dead, or its pid now belongs to another process
    for kept in (live, unmarked, other_host, other_target):
        assert (kept / "model.onnx.data").is_file()


def test_sigkill_mid_export_is_cleaned_by_the_next_export(ckpt, tmp_path):
    out = tmp_path / "out"
    script = (
        "import sys, time, onnx_ir as ir\n"
        "real = ir.save\n"
        "def slow(*a, **k):\n"
        "    real(*a, **k); print('saved', flush=True); time.sleep(60)\n"
        "ir.save = slow\n"
        "from phi_onnx.export import ExportOptions, export\n"
        f"export({str(ckpt)!r}, {str(out)!r}, ExportOptions(precision='fp32'))\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "saved"
    proc.kill()
    proc.wait()
    leftovers = [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
    assert len(leftovers) == 1 and (leftovers[0] / "model.onnx.data").stat().st_size > 0
    export(ckpt, out, FP32)
    assert hidden_leftovers(tmp_path) == [] and (out / "model.onnx").is_file()


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o755), (0o077, 0o700), (0o002, 0o775)])
def test_export_folder_gets_the_umask(umask, mode, ckpt, tmp_path):
    old = os.umask(umask)
    try:
        export(ckpt, tmp_path / "out", FP32)
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == mode
    for name in ("model.onnx", "model.onnx.data", "phi_onnx.json", "genai_config.json"):
        assert (tmp_path / "out" / name).stat().st_mode & 0o777 == mode & 0o666


def test_lock_is_exclusive_and_removed(tmp_path):
    target = tmp_path / "out"
    order: list[str] = []

    def hold() -> None:
        with output_module._lock(target):
            order.append("a-in")
            time.sleep(0.3)
            order.append("a-out")

    thread = threading.Thread(target=hold)
    thread.start()
    time.sleep(0.1)
    with output_module._lock(target):
        order.append("b-in")
    thread.join()
    assert order == ["a-in", "a-out", "b-in"]
    assert not (tmp_path / ".out.phi-onnx.lock").exists()


def test_a_lock_file_of_another_tool_beside_the_output_is_kept(ckpt, tmp_path):
    (tmp_path / ".out.lock").write_text("another tool's lock")
    export(ckpt, tmp_path / "out", FP32)
    export(ckpt, tmp_path / "out", FP32, overwrite=True)
    assert (tmp_path / ".out.lock").read_text() == "another tool's lock"

def test_a_name_as_long_as_the_file_system_allows(ckpt, tmp_path):
    out = tmp_path / ("n" * 250)  # its staging name gets 18 more characters: over the 255-byte limit if not cut
    export(ckpt, out, FP32)
    export(ckpt, out, FP32, overwrite=True)
    assert (out / "model.onnx").is_file() and hidden_leftovers(tmp_path) == []

def test_failed_swap_puts_the_old_export_back(ckpt, tmp_path, monkeypatch):
    out = tmp_path / "out"
    export(ckpt, out, FP32)
    before = snapshot(out)
    real_rename = os.rename
    calls: list[str] = []

    def rename(src, dst):
        calls.append(Path(src).name)
        if len(calls) == 2:  # the new export onto the target, after the old one was moved aside
            raise OSError(5, "Input/output error")
        return real_rename(src, dst)

    monkeypatch.setattr(output_module.os, "rename", rename)
    with pytest.raises(OSError, match="Input/output error"):
        export(ckpt, out, OTHER, overwrite=True)
    assert calls[0] == "out" and snapshot(out) == before
    assert hidden_leftovers(tmp_path) == []


def test_file_dropped_into_the_old_export_at_the_last_moment_survives(ckpt, tmp_path, monkeypatch):
    """Deleting the old export goes by the names that were checked: anything else stays, in the aside folder."""
    out = tmp_path / "out"
    export(ckpt, out, FP32)
    real_rename = os.rename

    def rename(src, dst):
        result = real_rename(src, dst)
        if Path(src) == out:  # moved aside: someone writes into it just then
            (Path(dst) / "late.txt").write_text("mine")
        return result

    monkeypatch.setattr(output_module.os, "rename", rename)
    export(ckpt, out, OTHER, overwrite=True)
    assert json.loads((out / "phi_onnx.json").read_text())["options"]["max_length"] == 64
    aside = [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
    assert len(aside) == 1 and sorted(p.name for p in aside[0].iterdir()) == ["late.txt"]
