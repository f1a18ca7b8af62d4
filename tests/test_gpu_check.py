"""benchmarks/gpu_check.sh --dry-run: every step's command resolves and the JSON report has its figures."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"


@pytest.mark.slow  # ~35 s: it exports, verifies (torch) and measures the tiny model
@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
def test_dry_run_writes_the_report(tmp_path):
    out = tmp_path / "report.json"
    # The dry run uses the `python` on PATH: this interpreter's, also when its venv is not activated.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "GPU_CHECK_DRY_RUN": "1", "PATH": path}
    done = subprocess.run(["bash", str(SCRIPT), "--out", str(out), "--work", str(tmp_path / "work")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert report["gpu"] is False and report["dry_run"] is True and report["passed"] is True
    names = [s["name"] for s in report["steps"]]
    assert names[:3] == ["tools", "doctor", "pytest_cuda"]
    assert {"export_tiny_cpu-int4", "verify_tiny_cpu-int4", "speed_tiny-cpu-int4"} <= set(names)
    assert all(s["exit_code"] == 0 for s in report["steps"])
    assert report["verify"]["tiny_cpu-int4"]["passed"] is True
    speed = report["speed"]["tiny-cpu-int4"]
    for runner in ("phi-onnx ort", "phi-onnx genai", "onnxruntime-genai"):
        assert speed["single"][runner]["decode_tokens_per_second"] > 0
    assert speed["batched"]["phi-onnx ort"]["decode_tokens_per_second"] > 0
    assert "collected" in report["pytest_cuda"]["summary"]


def test_unknown_argument_is_refused():
    done = subprocess.run(["bash", str(SCRIPT), "--bogus"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "unknown argument --bogus" in done.stderr
