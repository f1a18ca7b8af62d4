"""Which execution provider a model runs on, decided honestly.

`onnxruntime.get_available_providers()` lists CUDA whenever the CUDA build is installed, even when
libcudnn or the driver is missing; ONNX Runtime then silently runs the session on CPU. The only
reliable check is a real session's `get_providers()`, so `probe_cuda` creates one on a one-node
model; when that falls back to CPU, loading the provider library ourselves names the missing library.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import numbers
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from phi_onnx.errors import OptionsError, PhiOnnxError
from phi_onnx.runtime.errors import DeviceError

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
INSTALL_CUDA_HINT = ("Install the CUDA build: `pip uninstall onnxruntime onnxruntime-genai && "
                     "pip install \"phi-onnx[cuda]\"` (onnxruntime-gpu needs CUDA 12 and cuDNN 9).")


#: Intra-op threads allowed per CPU core. More than one per core only slows ONNX Runtime down; a few
#: are allowed for machines whose core count the process sees wrongly, but not the million threads a
#: typo asks for, which ONNX Runtime would try to create (it hangs, then runs out of memory).
THREADS_PER_CORE = 4


def max_threads() -> int:
    """The most intra-op threads `check_threads` accepts on this machine."""
    return THREADS_PER_CORE * (os.cpu_count() or 1)


def check_threads(threads: object, name: str = "threads", error: type[PhiOnnxError] = OptionsError) -> int | None:
    """`threads` when it is None (ONNX Runtime's default), 0 (the same) or a thread count this machine
    can use; else `error` naming `name` (e.g. "threads", "--threads", a genai_config field) and the cores.

    The one check behind `load(threads=...)`, every command's `--threads` and genai_config.json's
    session options.
    """
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, numbers.Integral) or threads < 0:
        raise error(f"{name} must be a whole number >= 0 (got {threads!r}).",
                    hint="Use e.g. 4, or leave it out (0) for one thread per physical core.")
    cores = os.cpu_count() or 1
    if threads > max_threads():
        raise error(f"{name} is {threads}, more threads than this machine can use: it has {cores} CPU "
                    f"core{'s' if cores != 1 else ''}, so at most {max_threads()} ({THREADS_PER_CORE} per core).",
                    hint=f"Use at most {cores} (one per core is fastest), or leave it out for ONNX Runtime's "
                         "default of one per physical core.")
    return int(threads)


@dataclass(frozen=True)
class DeviceChoice:
    """Where a model runs: `kind` is "cpu" or "cuda"; `reason` says why (for device="auto")."""

    kind: str
    device_id: int = 0
    reason: str = ""

    @property
    def name(self) -> str:
        """"cpu" or "cuda:N"."""
        return "cpu" if self.kind == "cpu" else f"cuda:{self.device_id}"

    @property
    def provider(self) -> str:
        """The ONNX Runtime execution provider name."""
        return CUDA if self.kind == "cuda" else CPU

    def ort_providers(self) -> list[str | tuple[str, dict[str, str]]]:
        """The `providers` argument for an InferenceSession (CPU stays last for unsupported ops)."""
        if self.kind == "cuda":
            return [(CUDA, {"device_id": str(self.device_id)}), CPU]
        return [CPU]


def parse_device(device: str) -> tuple[str, int | None]:
    """Split "auto" / "cpu" / "cuda" / "cuda:N" into (kind, id or None); raises DeviceError otherwise."""
    match = re.fullmatch(r"(auto|cpu|cuda)(?::(\d+))?", device.strip().lower())
    if not match or (match.group(2) is not None and match.group(1) != "cuda"):
        raise DeviceError(f"Unknown device {device!r}.", hint="Use auto, cpu, cuda or cuda:N (e.g. cuda:1).")
    return match.group(1), None if match.group(2) is None else int(match.group(2))


@functools.lru_cache(maxsize=8)
def probe_cuda(device_id: int = 0) -> str | None:
    """None when ONNX Runtime really runs a session on CUDA device `device_id`, else why not."""
    import onnxruntime as ort

    if CUDA not in ort.get_available_providers():
        return (f"the installed onnxruntime {ort.__version__} has no CUDA execution provider "
                f"(providers: {', '.join(ort.get_available_providers())})")
    try:
        session = ort.InferenceSession(_identity_model(), providers=[(CUDA, {"device_id": str(device_id)}), CPU])
    except Exception as error:  # ORT raises its own exception types for bad device ids
        return f"CUDA device {device_id} cannot be used ({error})"
    if session.get_providers()[0] == CUDA:
        return None
    # The session fell back to CPU; loading the provider library ourselves names what is missing.
    return _provider_library_problem(Path(ort.__file__).parent / "capi") or (
        "the CUDA execution provider did not load (onnxruntime fell back to CPU; its log above names the "
        "cause, usually libcudnn, libcublas or the NVIDIA driver)")


def _provider_library_problem(capi: Path) -> str | None:
    """Load the CUDA provider library the way ORT would; the OSError names the missing dependency."""
    if sys.platform == "win32":
        shared, cuda = capi / "onnxruntime_providers_shared.dll", capi / "onnxruntime_providers_cuda.dll"
    else:
        shared, cuda = capi / "libonnxruntime_providers_shared.so", capi / "libonnxruntime_providers_cuda.so"
    if not cuda.is_file():
        return f"the CUDA execution provider library is missing ({cuda.name} not in {capi})"
    try:
        if shared.is_file():
            ctypes.CDLL(str(shared), mode=ctypes.RTLD_GLOBAL)
        ctypes.CDLL(str(cuda))
    except OSError as error:
        return f"the CUDA execution provider cannot load: {error}"
    return None


def _identity_model() -> bytes:
    """A one-node float model, enough to see which provider a session picks."""
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def resolve_device(device: str, export_device: str) -> DeviceChoice:
    """Pick the device for a model exported for `export_device` ("cpu" or "cuda").

    "auto" uses CUDA only when it really works and the export targets it, else CPU with the reason;
    "cuda"/"cuda:N" that cannot work raises DeviceError naming the missing piece.
    """
    kind, device_id = parse_device(device)
    if kind == "cpu":
        if export_device == "cuda":
            log.warning("This export targets CUDA (fp16); on CPU it runs, but slowly. "
                        "Export with --device cpu for a CPU build.")
        return DeviceChoice("cpu", reason="device=cpu was requested")
    if kind == "cuda":
        problem = probe_cuda(device_id or 0)
        if problem:
            raise DeviceError(f"device={device!r} cannot be used: {problem}.", hint=INSTALL_CUDA_HINT)
        if export_device != "cuda":
            raise DeviceError(
                f"device={device!r}: this model was exported for CPU (fp32 activations), which ONNX Runtime's "
                "CUDA GroupQueryAttention does not run.",
                hint="Export again with `--device cuda` (fp16 or int4), or run this export with device=cpu.")
        return DeviceChoice("cuda", device_id or 0, reason=f"device={device!r} was requested")
    problem = probe_cuda(0)
    if problem:
        reason = f"CUDA not used: {problem}"
    elif export_device != "cuda":
        reason = "CUDA is available, but this export targets CPU; export with --device cuda to use the GPU"
    else:
        return DeviceChoice("cuda", 0, reason="CUDA execution provider loads")
    if export_device == "cuda":
        reason += " (this CUDA export runs slowly on CPU)"
    # On a CPU-only install with no GPU nobody expects CUDA: the reason stays available (Model.device_reason).
    log.log(logging.WARNING if cuda_expected() else logging.DEBUG, "%s; running on CPU.", reason)
    return DeviceChoice("cpu", reason=reason)


def cuda_expected() -> bool:
    """Whether a user could expect CUDA here: a CUDA build of ONNX Runtime is installed, or a GPU is visible."""
    from importlib.metadata import PackageNotFoundError, distribution

    for dist in ("onnxruntime-gpu", "onnxruntime-genai-cuda"):
        try:
            distribution(dist)
            return True
        except PackageNotFoundError:
            continue
    ort = sys.modules.get("onnxruntime")
    if ort is not None and CUDA in ort.get_available_providers():
        return True
    return Path("/dev/nvidia0").exists() or Path("/proc/driver/nvidia/gpus").is_dir()
