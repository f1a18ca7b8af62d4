"""`phi-onnx doctor`: why CUDA does or does not work here, and the install mistakes that cause it.

Gathering facts (installed distributions, CUDA/cuDNN libraries on disk, the ONNX Runtime build, GPUs) is
kept apart from judging them: `diagnose()` takes those facts as plain data, so every known mistake can be
tested with made-up installs.
"""

from __future__ import annotations

import glob
import logging
import os
import platform
import re
import shutil
import struct
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: Distributions that each install the one `onnxruntime` Python module: two of them overwrite each other.
ORT_DISTRIBUTIONS: tuple[str, ...] = (
    "onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino", "onnxruntime-qnn",
    "onnxruntime-rocm", "onnxruntime-migraphx", "onnxruntime-training", "ort-nightly", "ort-nightly-gpu",
)
#: Same for the `onnxruntime_genai` module.
GENAI_DISTRIBUTIONS: tuple[str, ...] = (
    "onnxruntime-genai", "onnxruntime-genai-cuda", "onnxruntime-genai-directml", "onnxruntime-genai-rocm",
)
GPU_ORT = "onnxruntime-gpu"
CUDA_GENAI = "onnxruntime-genai-cuda"

#: Libraries the CUDA execution provider loads, by file name (Linux `libX.so.N`, Windows `X64_N.dll`).
LIBRARY_PATTERNS: dict[str, tuple[str, ...]] = {
    "cudart": (r"^libcudart\.so\.(\d+)$", r"^cudart64_(\d+)\.dll$"),
    "cublas": (r"^libcublas\.so\.(\d+)$", r"^cublas64_(\d+)\.dll$"),
    "cublasLt": (r"^libcublasLt\.so\.(\d+)$", r"^cublasLt64_(\d+)\.dll$"),
    "cufft": (r"^libcufft\.so\.(\d+)$", r"^cufft64_(\d+)\.dll$"),
    "cudnn": (r"^libcudnn\.so\.(\d+)$", r"^cudnn64_(\d+)\.dll$"),
    "driver": (r"^libcuda\.so\.(\d+)$", r"^nvcuda\.dll$"),
}

#: The CUDA and cuDNN majors the PyPI onnxruntime-gpu builds link against, by version, for when the build
#: does not say so itself (its build_and_package_info, its provider library's dependencies): 1.19 made
#: CUDA 12 / cuDNN 9 the default; 1.31 needs CUDA 13 / cuDNN 9. Newest first: (from version, cuda, cudnn).
ORT_GPU_CUDA_TABLE: tuple[tuple[tuple[int, int], int, int], ...] = (
    ((1, 31), 13, 9),
    ((1, 19), 12, 9),
    ((1, 0), 11, 8),
)


@dataclass(frozen=True)
class Library:
    """A CUDA-stack shared library found on disk (`name` is a key of LIBRARY_PATTERNS)."""

    name: str
    major: int | None
    path: str
    origin: str

    @property
    def version(self) -> str | None:
        """The full version when the file name carries it (libcudart.so.12.4.127 → 12.4.127)."""
        match = re.search(r"\.so\.(\d+(?:\.\d+)+)$", self.path)
        return match.group(1) if match else None


@dataclass(frozen=True)
class OrtBuild:
    """The ONNX Runtime that `import onnxruntime` loads, and the CUDA/cuDNN majors it needs (None: CPU build
    or unknown); `requirement_source` says where those majors were read."""

    package: str
    version: str
    providers: tuple[str, ...]
    cuda_major: int | None = None
    cudnn_major: int | None = None
    requirement_source: str = ""


@dataclass(frozen=True)
class Problem:
    """A known install mistake (or missing piece), what it does, and the command that fixes it."""

    severity: str  # "error": CUDA cannot work or the install is broken; "warning": works, but not as meant
    title: str
    detail: str
    fix: str


@dataclass
class Report:
    """Everything `phi-onnx doctor` found."""

    python: str
    platform: str
    distributions: dict[str, str]
    onnxruntime: OrtBuild | None
    onnxruntime_genai: str | None
    libraries: list[Library]
    driver: str | None
    gpus: list[str]
    providers: dict[str, str | None]  # listed provider → None when a session really runs on it, else why not
    problems: list[Problem] = field(default_factory=list)

    @property
    def cuda_works(self) -> bool:
        """True when a session really runs on the CUDA execution provider."""
        return "CUDAExecutionProvider" in self.providers and self.providers["CUDAExecutionProvider"] is None

    @property
    def verdict(self) -> str:
        """One line: CUDA works, or CPU only and the main reason."""
        if self.cuda_works:
            return "CUDA works: ONNX Runtime runs sessions on the CUDA execution provider."
        why = self.providers.get("CUDAExecutionProvider") or next(
            (p.detail for p in self.problems if p.severity == "error"), None)
        if why is None and self.onnxruntime is not None:
            why = (f"the installed {self.onnxruntime.package} {self.onnxruntime.version} is a CPU build, without "
                   f"the CUDA execution provider (providers: {', '.join(self.onnxruntime.providers)})")
        if why is not None and not self.gpus and self.driver is None:
            why += "; and no NVIDIA GPU or driver was found on this machine"
        return f"CPU only: {why or 'onnxruntime is not installed'}."

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (`phi-onnx doctor --json`)."""
        data = asdict(self)
        data["libraries"] = [{**asdict(lib), "version": lib.version} for lib in self.libraries]
        data["cuda_works"] = self.cuda_works
        data["verdict"] = self.verdict
        data["providers"] = {"listed": list(self.providers),
                             "loads": [name for name, why in self.providers.items() if why is None],
                             "reasons": {name: why for name, why in self.providers.items() if why is not None}}
        return data


# --------------------------------------------------------------------------- judging (pure)


def required_cuda(version: str) -> tuple[int, int]:
    """(CUDA major, cuDNN major) the PyPI onnxruntime-gpu `version` is built for, from ORT_GPU_CUDA_TABLE."""
    numbers = tuple(int(part) for part in re.findall(r"\d+", version)[:2]) or (0, 0)
    for since, cuda, cudnn in ORT_GPU_CUDA_TABLE:
        if numbers >= since:
            return cuda, cudnn
    return ORT_GPU_CUDA_TABLE[-1][1:]


def _uninstall(names: Iterable[str]) -> str:
    return "pip uninstall -y " + " ".join(sorted(names))


def diagnose(distributions: Mapping[str, str], libraries: Sequence[Library], build: OrtBuild | None, *,
             gpus: Sequence[str] = (), driver: str | None = None) -> list[Problem]:
    """The known install mistakes in this set of facts.

    Args:
        distributions: installed distribution name (lower case, dashes) → version.
        libraries: CUDA/cuDNN libraries found on disk.
        build: the ONNX Runtime module that imports (None when none does).
        gpus: GPUs seen (names); driver: the NVIDIA driver version, if one is loaded.
    """
    dists = {name.lower().replace("_", "-"): version for name, version in distributions.items()}
    problems: list[Problem] = []
    orts = [name for name in ORT_DISTRIBUTIONS if name in dists]
    genais = [name for name in GENAI_DISTRIBUTIONS if name in dists]
    wants_cuda = GPU_ORT in dists or CUDA_GENAI in dists
    extra = "cuda" if wants_cuda else "cpu"

    if len(orts) > 1:
        problems.append(Problem(
            "error", f"{' and '.join(orts)} are all installed",
            f"{', '.join(f'{n} {dists[n]}' for n in orts)} each install the same `onnxruntime` Python module, "
            "so the one installed last overwrote the others' files; a CPU build over onnxruntime-gpu makes CUDA "
            "silently disappear, and a mixed install can fail to import.",
            f'{_uninstall(orts)} && pip install "phi-onnx[{extra}]"'))
    if len(genais) > 1:
        problems.append(Problem(
            "error", f"{' and '.join(genais)} are all installed",
            f"{', '.join(f'{n} {dists[n]}' for n in genais)} each install the same `onnxruntime_genai` module; "
            "whichever was installed last is the one you get.",
            f'{_uninstall(genais)} && pip install "phi-onnx[{extra}]"'))
    if CUDA_GENAI in dists and GPU_ORT not in dists and orts:
        problems.append(Problem(
            "error", f"{CUDA_GENAI} is installed with the CPU onnxruntime",
            f"{CUDA_GENAI} {dists[CUDA_GENAI]} is built against onnxruntime-gpu, but only {', '.join(orts)} is "
            "installed: it cannot use CUDA and may fail to load.",
            f'{_uninstall(orts + genais)} && pip install "phi-onnx[cuda]"'))
    if GPU_ORT in dists and genais and CUDA_GENAI not in genais:
        problems.append(Problem(
            "warning", f"{GPU_ORT} is installed with a non-CUDA onnxruntime-genai",
            f"{', '.join(genais)} runs generation on CPU only, although {GPU_ORT} {dists[GPU_ORT]} could use CUDA "
            "(phi-onnx's own `--backend ort` still uses CUDA).",
            f'{_uninstall(genais)} && pip install {CUDA_GENAI}'))
    if build is None:
        if orts:
            problems.append(Problem(
                "error", "onnxruntime does not import",
                f"{', '.join(orts)} is installed, but `import onnxruntime` fails (often the result of two builds "
                "overwriting each other, or a missing system library).",
                f'{_uninstall(orts)} && pip install "phi-onnx[{extra}]"'))
        else:
            problems.append(Problem("error", "onnxruntime is not installed",
                                    "phi-onnx runs models with ONNX Runtime.", 'pip install "phi-onnx[cpu]"  '
                                    '# or "phi-onnx[cuda]" on an NVIDIA GPU'))
        return problems

    has_cuda_ep = "CUDAExecutionProvider" in build.providers
    if GPU_ORT in dists and not has_cuda_ep:
        problems.append(Problem(
            "error", f"{GPU_ORT} is installed, but the onnxruntime module is a CPU build",
            f"`import onnxruntime` loads {build.package} {build.version} (providers: {', '.join(build.providers)}): "
            f"another onnxruntime distribution overwrote {GPU_ORT}'s files.",
            f'{_uninstall(orts or [GPU_ORT])} && pip install "phi-onnx[cuda]"'))
    if not has_cuda_ep:
        return problems  # a CPU build: nothing CUDA-related can be wrong with it

    if build.cuda_major is not None:
        _check_major(problems, build, libraries, "cudart", build.cuda_major, "CUDA runtime", "nvidia-cuda-runtime")
        _check_major(problems, build, libraries, "cublas", build.cuda_major, "cuBLAS", "nvidia-cublas")
    if build.cudnn_major is not None:
        _check_major(problems, build, libraries, "cudnn", build.cudnn_major, "cuDNN", "nvidia-cudnn")
    if driver is None and not any(lib.name == "driver" for lib in libraries):
        problems.append(Problem(
            "error", "no NVIDIA driver",
            "libcuda (the driver library) is not installed or not on the loader path, so no CUDA program can run "
            "here; in a container, the GPU was not passed in.",
            "Install the NVIDIA driver (or run the container with --gpus all), then check `nvidia-smi`."))
    elif not gpus:
        problems.append(Problem(
            "error", "no GPU seen",
            "The NVIDIA driver library is present but `nvidia-smi` lists no GPU.",
            "Check `nvidia-smi`; in a container, pass the GPU in (--gpus all) and set CUDA_VISIBLE_DEVICES correctly."))
    return problems


def _check_major(problems: list[Problem], build: OrtBuild, libraries: Sequence[Library], name: str, needed: int,
                 label: str, pip_name: str) -> None:
    found = [lib for lib in libraries if lib.name == name]
    if any(lib.major == needed for lib in found):
        return
    package = pip_package(pip_name, build.cuda_major or 12, needed)
    have = (", ".join(f"{label} {lib.major} ({lib.path})" for lib in found) if found else "none")
    detail = (f"{build.package} {build.version} needs {label} {needed} ({build.requirement_source}); found: {have}.")
    if found:
        title = f"{label} version mismatch: this onnxruntime needs {needed}, found " + ", ".join(
            sorted({str(lib.major) for lib in found}))
        detail += (" A different major version does not work: ONNX Runtime loads the exact library "
                   "(e.g. libcudart.so.N).")
    else:
        title = f"{label} {needed} not found"
    problems.append(Problem(
        "error", title, detail,
        f"pip install {package}  # or install {label} {needed} system-wide and put it on LD_LIBRARY_PATH; "
        f"or install the onnxruntime-gpu release built for the {label} you have"))


def pip_package(base: str, cuda_major: int, major: int) -> str:
    """NVIDIA's pip name for a library: `-cu12` suffixes up to CUDA 12; from CUDA 13 the toolkit packages
    carry the major in their version instead, and cuDNN keeps a `-cuN` suffix for its CUDA."""
    if base == "nvidia-cudnn":
        return f"nvidia-cudnn-cu{cuda_major}=={major}.*"
    return f"{base}-cu{cuda_major}" if cuda_major <= 12 else f"{base}=={major}.*"


# --------------------------------------------------------------------------- gathering facts


def installed_distributions() -> dict[str, str]:
    """Installed distributions that matter here: ONNX Runtime and genai flavours, NVIDIA pip libraries, torch."""
    from importlib.metadata import distributions

    found: dict[str, str] = {}
    for dist in distributions():
        name = (dist.metadata.get("Name") or "").lower().replace("_", "-")
        if name.startswith(("onnxruntime", "ort-nightly", "nvidia-")) or name in ("torch", "phi-onnx"):
            found[name] = dist.version
    return dict(sorted(found.items()))


def _match(filename: str) -> tuple[str, int | None] | None:
    for name, patterns in LIBRARY_PATTERNS.items():
        for pattern in patterns:
            match = re.match(pattern, filename)
            if match:
                return name, int(match.group(1)) if match.groups() else None
    return None


def find_libraries(extra_dirs: Sequence[str] = ()) -> list[Library]:
    """CUDA, cuBLAS, cuFFT, cuDNN and driver libraries in the places ONNX Runtime (or its loader) looks:
    NVIDIA pip packages, LD_LIBRARY_PATH / PATH, CUDA_HOME / CUDA_PATH, /usr/local/cuda*, the ldconfig cache."""
    dirs: list[tuple[str, str]] = [(d, "given") for d in extra_dirs]
    for site in {Path(p) for p in sys.path if p.endswith("site-packages")}:
        for lib_dir in sorted(glob.glob(str(site / "nvidia" / "**" / "lib"), recursive=True)) + sorted(
                glob.glob(str(site / "nvidia" / "**" / "bin"), recursive=True)):
            dirs.append((lib_dir, "pip"))
    env = "PATH" if sys.platform == "win32" else "LD_LIBRARY_PATH"
    dirs += [(d, env) for d in os.environ.get(env, "").split(os.pathsep) if d]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            dirs += [(str(Path(os.environ[var]) / sub), var) for sub in ("lib64", "lib", "bin")]
    dirs += [(d, "cuda toolkit") for d in sorted(glob.glob("/usr/local/cuda*/lib*")) + sorted(
        glob.glob("/usr/local/cuda*/targets/*/lib"))]
    found: dict[str, Library] = {}
    for directory, origin in dirs:
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        for filename in sorted(names):
            matched = _match(filename)
            if matched:
                path = os.path.realpath(os.path.join(directory, filename))
                found.setdefault(path, Library(matched[0], matched[1], path, origin))
    for filename, path in _ldconfig_entries():
        matched = _match(filename)
        if matched:
            found.setdefault(os.path.realpath(path), Library(matched[0], matched[1], path, "ldconfig"))
    return sorted(found.values(), key=lambda lib: (lib.name, lib.major or 0, lib.path))


def _ldconfig_entries() -> list[tuple[str, str]]:
    """(file name, path) pairs from the dynamic loader's cache (`ldconfig -p`), Linux only."""
    ldconfig = shutil.which("ldconfig") or ("/sbin/ldconfig" if Path("/sbin/ldconfig").exists() else None)
    if sys.platform != "linux" or ldconfig is None:
        return []
    try:
        out = subprocess.run([ldconfig, "-p"], capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^\s*(\S+) \(.*\) => (\S+)$", out, re.M)]


def gpus_and_driver() -> tuple[list[str], str | None]:
    """GPUs `nvidia-smi` lists (or /proc/driver/nvidia has) and the driver version; ([], None) without one."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=index,name,memory.total,driver_version",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=20, check=False)
            rows = [line.strip() for line in out.stdout.splitlines() if line.strip()]
            if out.returncode == 0 and rows:
                return [", ".join(r.split(", ")[:3]) for r in rows], rows[0].split(", ")[-1]
        except (OSError, subprocess.SubprocessError) as error:
            log.debug("nvidia-smi failed: %s", error)
    gpus = []
    for info in sorted(glob.glob("/proc/driver/nvidia/gpus/*/information")):
        text = Path(info).read_text(errors="replace")
        model = re.search(r"^Model:\s*(.+)$", text, re.M)
        gpus.append(model.group(1).strip() if model else Path(info).parent.name)
    driver = None
    version_file = Path("/proc/driver/nvidia/version")
    if version_file.is_file():
        match = re.search(r"Kernel Module\s+(\S+)", version_file.read_text(errors="replace"))
        driver = match.group(1) if match else "loaded"
    return gpus, driver


def ort_build() -> OrtBuild | None:
    """The onnxruntime module that imports, with the CUDA/cuDNN majors it needs (from its own build info,
    else its CUDA provider library's dependencies, else the version table)."""
    try:
        import onnxruntime as ort
    except Exception as error:  # a half-overwritten install raises all kinds of errors on import
        log.debug("import onnxruntime failed: %s", error)
        return None
    try:
        from onnxruntime.capi import build_and_package_info as info
    except ImportError:
        info = None  # type: ignore[assignment]
    package = str(getattr(info, "package_name", "onnxruntime"))
    providers = tuple(ort.get_available_providers())
    if "CUDAExecutionProvider" not in providers:
        return OrtBuild(package, ort.__version__, providers)
    cuda = _major(getattr(info, "cuda_version", None))
    cudnn = _major(getattr(info, "cudnn_version", None))
    source = "its build info"
    if cuda is None or cudnn is None:
        needed = _needed_majors(Path(ort.__file__).parent / "capi" / "libonnxruntime_providers_cuda.so")
        if needed.get("cudart") is not None:
            cuda, cudnn = needed["cudart"], needed.get("cudnn", cudnn)
            source = "the libraries its CUDA provider links"
        else:
            cuda, cudnn = required_cuda(ort.__version__)
            source = "phi-onnx's table of onnxruntime-gpu releases"
    return OrtBuild(package, ort.__version__, providers, cuda, cudnn, source)


def _major(version: Any) -> int | None:
    match = re.match(r"\s*(\d+)", str(version)) if version else None
    return int(match.group(1)) if match else None


def _needed_majors(library: Path) -> dict[str, int | None]:
    """The CUDA library majors an ELF shared library names in its dynamic section (DT_NEEDED)."""
    needed: dict[str, int | None] = {}
    for filename in _elf_needed(library):
        matched = _match(filename)
        if matched:
            needed[matched[0]] = matched[1]
    return needed


def _elf_needed(path: Path) -> list[str]:
    """DT_NEEDED entries of a 64-bit little-endian ELF file, read from its section headers only."""
    try:
        with path.open("rb") as handle:
            header = handle.read(64)
            if header[:4] != b"\x7fELF" or header[4] != 2 or header[5] != 1:
                return []
            shoff, = struct.unpack_from("<Q", header, 0x28)
            shentsize, shnum = struct.unpack_from("<HH", header, 0x3A)
            handle.seek(shoff)
            sections = [struct.unpack_from("<IIQQQQIIQQ", handle.read(shentsize)) for _ in range(shnum)]
            dynamic = next((s for s in sections if s[1] == 6), None)  # SHT_DYNAMIC
            if dynamic is None:
                return []
            strtab = sections[dynamic[6]]  # sh_link: the string table the entries point into
            handle.seek(strtab[4])
            strings = handle.read(strtab[5])
            handle.seek(dynamic[4])
            raw = handle.read(dynamic[5])
    except (OSError, struct.error, IndexError):
        return []
    names = []
    for offset in range(0, len(raw) - 15, 16):
        tag, value = struct.unpack_from("<qQ", raw, offset)
        if tag == 0:
            break
        if tag == 1:  # DT_NEEDED
            end = strings.find(b"\0", value)
            names.append(strings[value:end].decode(errors="replace"))
    return names


def probe_providers() -> dict[str, str | None]:
    """Each provider onnxruntime lists → None when a session really runs on it, else why not."""
    try:
        import onnxruntime as ort
    except Exception:  # reported by diagnose() as "does not import"
        return {}
    from phi_onnx.runtime.providers import CPU, CUDA, _identity_model, probe_cuda

    results: dict[str, str | None] = {}
    model = _identity_model()
    for provider in ort.get_available_providers():
        if provider == CUDA:
            results[provider] = probe_cuda(0)
            continue
        if provider == CPU:
            results[provider] = None
            continue
        try:
            session = ort.InferenceSession(model, providers=[provider, CPU])
            used = session.get_providers()
            results[provider] = None if used and used[0] == provider else (
                f"listed, but the session fell back to {used[0] if used else 'nothing'}")
        except Exception as error:  # each provider fails in its own way
            results[provider] = f"cannot create a session: {str(error).splitlines()[0] if str(error) else error}"
    return results


def run_doctor() -> Report:
    """Gather every fact and diagnose it."""
    distributions = installed_distributions()
    build = ort_build()
    try:
        from importlib.metadata import version

        genai = next((f"{name} {version(name)}" for name in GENAI_DISTRIBUTIONS if name in distributions), None)
    except Exception:  # metadata problems only lose this line
        genai = None
    libraries = find_libraries()
    gpus, driver = gpus_and_driver()
    report = Report(python=platform.python_version(), platform=platform.platform(), distributions=distributions,
                    onnxruntime=build, onnxruntime_genai=genai, libraries=libraries, driver=driver, gpus=gpus,
                    providers=probe_providers())
    report.problems = diagnose(distributions, libraries, build, gpus=gpus, driver=driver)
    return report


def format_report(report: Report) -> str:
    """The human-readable doctor output."""
    build = report.onnxruntime
    lines = [f"python          {report.python} on {report.platform}"]
    if build is None:
        lines.append("onnxruntime     does not import")
    else:
        needs = (f"; needs CUDA {build.cuda_major}, cuDNN {build.cudnn_major} ({build.requirement_source})"
                 if build.cuda_major else "")
        lines.append(f"onnxruntime     {build.package} {build.version}{needs}")
    lines.append(f"genai           {report.onnxruntime_genai or 'not installed'}")
    ort_dists = [f"{n} {v}" for n, v in report.distributions.items() if n.startswith(("onnxruntime", "ort-"))]
    lines.append(f"installed       {', '.join(ort_dists) or 'no onnxruntime distribution'}")
    nvidia = [f"{n} {v}" for n, v in report.distributions.items() if n.startswith("nvidia-")]
    if nvidia:
        lines.append(f"nvidia (pip)    {', '.join(nvidia)}")
    if report.libraries:
        for index, lib in enumerate(report.libraries):
            head = "libraries" if index == 0 else ""
            major = f" {lib.version or lib.major}" if lib.major is not None else ""
            lines.append(f"{head:<16}{lib.name}{major}  {lib.path}  ({lib.origin})")
    else:
        lines.append("libraries       no CUDA, cuBLAS or cuDNN libraries found")
    lines.append(f"driver          {report.driver or 'none'}")
    lines.append(f"GPUs            {'; '.join(report.gpus) if report.gpus else 'none seen'}")
    for index, (provider, why) in enumerate(report.providers.items()):
        head = "providers" if index == 0 else ""
        lines.append(f"{head:<16}{provider}: {'loads' if why is None else 'does not load: ' + why}")
    lines.append("")
    lines.append(report.verdict)
    for problem in report.problems:
        lines.append("")
        lines.append(f"{problem.severity.upper()}: {problem.title}")
        lines.append(f"  {problem.detail}")
        lines.append(f"  fix: {problem.fix}")
    if not report.cuda_works and build is not None and "CUDAExecutionProvider" not in build.providers \
            and not any(p.severity == "error" for p in report.problems):
        lines.append("")
        lines.append('For CUDA: pip uninstall -y onnxruntime onnxruntime-genai && pip install "phi-onnx[cuda]" '
                     "(needs an NVIDIA GPU and driver).")
    return "\n".join(lines)
