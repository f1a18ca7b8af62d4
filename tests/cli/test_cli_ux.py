"""The CLI is quiet and fast: light commands import no heavy module, options fail before the model loads,
text that is not UTF-8 is refused with a sentence, -v shows phi-onnx's own steps only."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from phi_onnx.cli import main

HEAVY = ("onnx_ir", "onnx", "onnxruntime", "onnxruntime_genai", "jinja2", "numpy")
PROBE = """
import json, sys
from phi_onnx.cli import main
try:
    main({args!r}, standalone_mode=False)
except SystemExit:
    pass
print(json.dumps(sorted(m for m in {heavy!r} if m in sys.modules)), file=sys.stderr)
"""


def run(*args: str, input: str | bytes | None = None):
    return CliRunner().invoke(main, list(args), input=input, catch_exceptions=False)


@pytest.fixture()
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("PHI_ONNX_HOME", str(tmp_path / "store"))
    return tmp_path / "store"


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    from phi_onnx.export import export

    folder = tmp_path_factory.mktemp("tiny") / "tiny-phi3"
    export("tiny-phi3", folder)
    return folder


@pytest.mark.parametrize("args", [["--version"], ["--help"], ["models"], ["list"], ["list", "--json"]])
def test_light_commands_import_no_heavy_module(args, tmp_path):
    env = {**os.environ, "PHI_ONNX_HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", PROBE.format(args=args, heavy=HEAVY)], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stderr.strip().splitlines()[-1]) == []


def test_import_phi_onnx_is_light_and_names_still_resolve():
    code = (f"import json, sys, phi_onnx; heavy = sorted(m for m in {HEAVY!r} if m in sys.modules); "
            "print(json.dumps([heavy, callable(phi_onnx.export), callable(phi_onnx.load), "
            "phi_onnx.ExportOptions().variant()]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    heavy, export_ok, load_ok, variant = json.loads(done.stdout)
    assert heavy == [] and export_ok and load_ok and variant == "cpu-int4-rtn-block-32"


def test_models_has_a_header_row():
    lines = run("models").stdout.splitlines()
    assert lines[0].split()[:2] == ["NAME", "HUB"] and "tiny-phi3" in lines[1]


def test_options_are_checked_before_the_model_is_loaded(home):
    # The model does not exist: the option error must come first, and nothing is exported.
    result = run("generate", "no-such-model", "x", "--top-p", "1.5")
    assert result.exit_code == 2 and "top_p" in result.stderr and "Unknown model" not in result.stderr
    empty = run("chat", "tiny-phi3", "--once", input="  \n")
    assert empty.exit_code == 2 and "empty" in empty.output
    assert not home.exists()


def test_generate_stdin_drops_one_trailing_newline(tiny_export):
    import phi_onnx

    model = phi_onnx.load(tiny_export, device="cpu")
    piped = run("generate", str(tiny_export), "-", "--max-new-tokens", "3", "--json", input="import os\n")
    assert piped.exit_code == 0, piped.output
    assert json.loads(piped.stdout)["prompt_tokens"] == len(model.encode("import os"))
    kept = run("generate", str(tiny_export), "-", "--max-new-tokens", "3", "--json", input="import os\n\n")
    assert json.loads(kept.stdout)["prompt_tokens"] == len(model.encode("import os\n"))


@pytest.mark.parametrize("command", [["generate", "-"], ["chat", "--once"]])
def test_stdin_that_is_not_utf8_is_refused(tiny_export, command):
    name, *rest = command
    result = run(name, str(tiny_export), *rest, input=b"caf\xe9 au lait\n")
    assert result.exit_code == 2
    assert "not valid UTF-8" in result.stderr and "Traceback" not in result.output


def test_argv_that_is_not_utf8_is_refused(tiny_export):
    done = subprocess.run([sys.executable, "-m", "phi_onnx", "generate", str(tiny_export).encode(), b"caf\xe9"],
                          capture_output=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert b"The prompt is not valid UTF-8" in done.stderr and b"Traceback" not in done.stderr
    system = run("chat", str(tiny_export), "--once", "--system", "caf\udce9", input="hi\n")
    assert system.exit_code == 2 and "system prompt is not valid UTF-8" in system.stderr


def test_interactive_chat_rejects_a_bad_line_and_goes_on(tiny_export):
    result = run("chat", str(tiny_export), "--max-new-tokens", "2", "--min-new-tokens", "2",
                 input=b"What does os do?\ncaf\xe9?\n/help\nWhat does re do?\n/exit\n")
    assert result.exit_code == 0, result.output
    assert "not valid UTF-8" in result.stderr
    assert result.stderr.count(" tokens") >= 2  # both good lines were answered (one stats line each)
    assert "/reset" in result.stderr.split("not valid UTF-8")[1]  # /help printed the commands


def test_verbose_shows_own_steps_not_third_party_info(tmp_path):
    env = {**os.environ, "PHI_ONNX_HOME": str(tmp_path / "store")}
    done = subprocess.run([sys.executable, "-m", "phi_onnx", "-v", "export", "tiny-phi3", "-o",
                           str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "INFO phi_onnx.export" in done.stderr
    assert "Stack (most recent call last)" not in done.stderr and "onnx_ir" not in done.stderr
    quiet = subprocess.run([sys.executable, "-m", "phi_onnx", "generate", str(tmp_path / "out"), "import os",
                            "--max-new-tokens", "2", "--json"], env=env, capture_output=True, text=True, timeout=60)
    assert quiet.returncode == 0, quiet.stderr
    from phi_onnx.runtime.providers import cuda_expected

    if not cuda_expected():  # a CPU-only install with no GPU: no "CUDA not used" line, nothing else either
        assert quiet.stderr == ""


@pytest.mark.parametrize("library, cli", [
    ("Pass --overwrite (overwrite=True) to replace it.", "Pass --overwrite to replace it."),
    ("device='cuda:1' cannot be used", "--device cuda:1 cannot be used"),
    ("or run this export with device=cpu.", "or run this export with --device cpu."),
    ("or use backend='ort'.", "or use --backend ort."),
    ("Keep (this) and (a=b c).", "Keep (this) and (a=b c)."),
])
def test_errors_use_the_command_line_spelling(library, cli):
    from phi_onnx.cli.errors import cli_wording

    assert cli_wording(library) == cli


def test_cuda_that_cannot_run_fails_before_exporting(home):
    from phi_onnx.runtime.providers import probe_cuda

    if probe_cuda(0) is None:
        pytest.skip("CUDA works here")
    result = run("chat", "tiny-phi3", "--device", "cuda", "--once", input="hi\n")
    assert result.exit_code == 2 and "--device cuda cannot be used" in result.stderr
    assert "device='cuda'" not in result.stderr and not home.exists()


def test_cuda_not_used_is_a_warning_only_where_cuda_was_expected(monkeypatch, caplog):
    import importlib.metadata
    import logging
    from pathlib import Path

    from phi_onnx.runtime import providers

    if Path("/dev/nvidia0").exists() or providers.probe_cuda(0) is None:
        pytest.skip("a GPU is visible here")
    real = importlib.metadata.distribution

    def without_cuda_builds(name):
        if name in ("onnxruntime-gpu", "onnxruntime-genai-cuda"):
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", without_cuda_builds)
    with caplog.at_level(logging.DEBUG, logger="phi_onnx"):
        providers.resolve_device("auto", "cpu")
    levels = {r.levelname for r in caplog.records if "CUDA not used" in r.getMessage()}
    assert levels == {"DEBUG"}

    caplog.clear()
    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: object())  # "onnxruntime-gpu is installed"
    with caplog.at_level(logging.DEBUG, logger="phi_onnx"):
        providers.resolve_device("auto", "cpu")
    levels = {r.levelname for r in caplog.records if "CUDA not used" in r.getMessage()}
    assert levels == {"WARNING"}


def test_verify_says_what_it_does_and_shows_perplexity_change_in_percent(tiny_export):
    pytest.importorskip("transformers")
    result = subprocess.run([sys.executable, "-m", "phi_onnx", "verify", str(tiny_export), "--new-tokens", "4",
                             "--text-tokens", "256", "--no-record"], capture_output=True, text=True, timeout=120)
    assert result.returncode in (0, 1), result.stderr
    assert "loading the export" in result.stderr and "perplexity: 1 windows" in result.stderr  # without -v
    line = next(line for line in result.stdout.splitlines() if "perplexity_change" in line)
    assert line.split()[2] == "%" and "limit <= 10 %" in line


@pytest.mark.parametrize("command", [["generate", "{path}", "hi"], ["chat", "{path}", "--once"],
                                     ["export", "{path}", "-o", "{out}"], ["bench", "{path}"]])
def test_a_path_too_long_for_the_file_system_is_one_sentence(command, tmp_path):
    path = str(tmp_path / ("a" * 5000))
    result = run(*[part.format(path=path, out=tmp_path / "out") for part in command], input="hi\n")
    assert result.exit_code == 2, result.output
    assert "too long for the file system" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()
