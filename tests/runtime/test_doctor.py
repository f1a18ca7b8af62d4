"""`phi-onnx doctor`: the known install mistakes, judged from made-up installs, and this machine's report."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from phi_onnx.cli import main
from phi_onnx.runtime.doctor import Library, OrtBuild, _elf_needed, diagnose, pip_package, required_cuda

CUDA_EPS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
GPU_131 = OrtBuild("onnxruntime-gpu", "1.31.0", CUDA_EPS, cuda_major=13, cudnn_major=9,
                   requirement_source="its build info")
GOOD_LIBS = [Library("cudart", 13, "/x/libcudart.so.13", "pip"), Library("cublas", 13, "/x/libcublas.so.13", "pip"),
             Library("cudnn", 9, "/x/libcudnn.so.9", "pip"), Library("driver", 1, "/usr/lib/libcuda.so.1", "ldconfig")]
GPUS = ["0, NVIDIA H100, 81559 MiB"]


def titles(problems) -> list[str]:
    return [p.title for p in problems]


def test_a_good_cuda_install_has_no_problems():
    dists = {"onnxruntime-gpu": "1.31.0", "onnxruntime-genai-cuda": "0.18.0"}
    assert diagnose(dists, GOOD_LIBS, GPU_131, gpus=GPUS, driver="580.1") == []


def test_cpu_and_gpu_onnxruntime_both_installed():
    dists = {"onnxruntime": "1.32.0", "onnxruntime-gpu": "1.31.0", "onnxruntime-genai-cuda": "0.18.0"}
    cpu_module = OrtBuild("onnxruntime", "1.32.0", ("CPUExecutionProvider",))  # the CPU one was installed last
    problems = diagnose(dists, GOOD_LIBS, cpu_module, gpus=GPUS, driver="580.1")
    assert titles(problems)[0] == "onnxruntime and onnxruntime-gpu are all installed"
    assert problems[0].severity == "error" and "same `onnxruntime` Python module" in problems[0].detail
    assert problems[0].fix == 'pip uninstall -y onnxruntime onnxruntime-gpu && pip install "phi-onnx[cuda]"'
    assert "onnxruntime-gpu is installed, but the onnxruntime module is a CPU build" in titles(problems)


def test_both_genai_builds_installed():
    dists = {"onnxruntime-gpu": "1.31.0", "onnxruntime-genai": "0.18.0", "onnxruntime-genai-cuda": "0.18.0"}
    problems = diagnose(dists, GOOD_LIBS, GPU_131, gpus=GPUS, driver="580.1")
    assert titles(problems) == ["onnxruntime-genai and onnxruntime-genai-cuda are all installed"]
    assert problems[0].fix.startswith("pip uninstall -y onnxruntime-genai onnxruntime-genai-cuda")


def test_genai_cuda_with_cpu_onnxruntime_and_gpu_with_cpu_genai():
    cpu = OrtBuild("onnxruntime", "1.32.0", ("CPUExecutionProvider",))
    problems = diagnose({"onnxruntime": "1.32.0", "onnxruntime-genai-cuda": "0.18.0"}, [], cpu)
    assert titles(problems) == ["onnxruntime-genai-cuda is installed with the CPU onnxruntime"]
    problems = diagnose({"onnxruntime-gpu": "1.31.0", "onnxruntime-genai": "0.18.0"}, GOOD_LIBS, GPU_131,
                        gpus=GPUS, driver="580.1")
    assert [p.severity for p in problems] == ["warning"]
    assert problems[0].fix == "pip uninstall -y onnxruntime-genai && pip install onnxruntime-genai-cuda"


def test_cuda_and_cudnn_major_mismatch():
    libs = [Library("cudart", 12, "/usr/local/cuda-12.4/lib64/libcudart.so.12", "cuda toolkit"),
            Library("cublas", 12, "/usr/local/cuda-12.4/lib64/libcublas.so.12", "cuda toolkit"),
            Library("cudnn", 8, "/usr/lib/libcudnn.so.8", "ldconfig"), GOOD_LIBS[-1]]
    problems = diagnose({"onnxruntime-gpu": "1.31.0"}, libs, GPU_131, gpus=GPUS, driver="580.1")
    assert titles(problems) == [
        "CUDA runtime version mismatch: this onnxruntime needs 13, found 12",
        "cuBLAS version mismatch: this onnxruntime needs 13, found 12",
        "cuDNN version mismatch: this onnxruntime needs 9, found 8"]
    assert "onnxruntime-gpu 1.31.0 needs CUDA runtime 13" in problems[0].detail
    assert problems[2].fix.startswith("pip install nvidia-cudnn-cu13==9.*")


def test_missing_libraries_and_driver():
    problems = diagnose({"onnxruntime-gpu": "1.31.0"}, [], GPU_131)
    assert titles(problems) == ["CUDA runtime 13 not found", "cuBLAS 13 not found", "cuDNN 9 not found",
                                "no NVIDIA driver"]
    problems = diagnose({"onnxruntime-gpu": "1.31.0"}, GOOD_LIBS, GPU_131, gpus=[], driver="580.1")
    assert titles(problems) == ["no GPU seen"]


def test_no_onnxruntime():
    assert titles(diagnose({}, [], None)) == ["onnxruntime is not installed"]
    assert titles(diagnose({"onnxruntime": "1.32.0"}, [], None)) == ["onnxruntime does not import"]


def test_cpu_build_alone_is_not_a_problem():
    cpu = OrtBuild("onnxruntime", "1.32.0", ("CPUExecutionProvider",))
    assert diagnose({"onnxruntime": "1.32.0", "onnxruntime-genai": "0.18.0"}, GOOD_LIBS[:1], cpu) == []


def test_version_table_and_pip_names():
    assert required_cuda("1.18.1") == (11, 8)
    assert required_cuda("1.22.0") == (12, 9)
    assert required_cuda("1.31.0") == (13, 9)
    assert pip_package("nvidia-cudnn", 12, 9) == "nvidia-cudnn-cu12==9.*"
    assert pip_package("nvidia-cublas", 12, 12) == "nvidia-cublas-cu12"
    assert pip_package("nvidia-cublas", 13, 13) == "nvidia-cublas==13.*"


@pytest.mark.skipif(sys.platform != "linux", reason="reads an ELF file")
def test_elf_needed_reads_dependencies():
    import onnxruntime

    capi = Path(onnxruntime.__file__).parent / "capi"
    library = next(capi.glob("onnxruntime_pybind11_state*.so"))
    needed = _elf_needed(library)
    assert any(name.startswith("libc.so") for name in needed) or any("libstdc++" in name for name in needed)
    assert _elf_needed(Path(__file__)) == []


def test_doctor_on_this_machine_reports_cpu_only_and_why():
    from phi_onnx.runtime.providers import probe_cuda

    if probe_cuda(0) is None:
        pytest.skip("CUDA works on this machine")
    result = CliRunner().invoke(main, ["doctor", "--json"], catch_exceptions=False)
    data = json.loads(result.stdout)
    assert data["cuda_works"] is False
    assert data["verdict"].startswith("CPU only: ") and len(data["verdict"]) > len("CPU only: .") + 20
    assert "CPUExecutionProvider" in data["providers"]["loads"]
    assert "CUDAExecutionProvider" not in data["providers"]["loads"]
    assert data["onnxruntime"]["version"]
    assert result.exit_code == (1 if any(p["severity"] == "error" for p in data["problems"]) else 0)
    text = CliRunner().invoke(main, ["doctor"], catch_exceptions=False).stdout
    assert "CPU only:" in text and "onnxruntime" in text and "providers" in text


def test_find_libraries_reads_majors_from_file_names(tmp_path):
    from phi_onnx.runtime.doctor import find_libraries

    (tmp_path / "libcudart.so.12.4.127").write_bytes(b"")
    (tmp_path / "libcudart.so.12").symlink_to(tmp_path / "libcudart.so.12.4.127")
    (tmp_path / "libcudnn.so.9").write_bytes(b"")
    (tmp_path / "libcudnn_ops.so.9").write_bytes(b"")  # a cuDNN sub-library, not the one ORT checks
    found = [lib for lib in find_libraries([str(tmp_path)]) if lib.path.startswith(str(tmp_path))]
    assert sorted((lib.name, lib.major, lib.version) for lib in found) == [("cudart", 12, "12.4.127"),
                                                                           ("cudnn", 9, None)]
