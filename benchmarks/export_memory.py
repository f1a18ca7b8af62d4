"""Export wall time and peak memory: phi-onnx versus onnxruntime-genai's model builder.

Each export runs in a fresh child process, one at a time, runners alternating. Peak RSS is the
kernel's high-water mark for the child (``os.wait4``'s ``ru_maxrss``, which counts file-backed
pages such as memory-mapped weights too); the child's anonymous and file-backed RSS are also
sampled from ``/proc`` to tell them apart. A child killed by a signal (the OOM killer sends
SIGKILL) or stopped at ``--timeout`` is recorded as such, not retried.

    python benchmarks/export_memory.py --ckpt /tmp/phi-bench/phi3-mini --json results.json
    python benchmarks/export_memory.py --ckpt CKPT --runners phi-onnx --precisions int4 --algos rtn,clip,gptq

`--algos` picks phi-onnx's int4 algorithms (onnxruntime-genai's builder has round-to-nearest only, so it
runs once, as `rtn`); `--block-size` their block size.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

RUNNERS = ("phi-onnx", "genai")
PRECISIONS = ("int4", "fp32")
ALGOS = ("rtn", "clip", "gptq")
GIB = 1024**3

PHI_ONNX_CHILD = """
import sys
from phi_onnx.export import ExportOptions, export
int4 = dict(algo=sys.argv[4], block_size=int(sys.argv[5])) if sys.argv[3] == "int4" else {}
export(sys.argv[1], sys.argv[2], ExportOptions(precision=sys.argv[3], **int4), overwrite=True)
"""


@dataclass
class Result:
    """One export: what ran and what it cost."""

    runner: str
    precision: str
    algo: str  # int4 algorithm ("-" for fp32)
    repeat: int
    status: str  # "ok", "exit N", "killed by SIGKILL (OOM?)", "timeout"
    wall_s: float
    peak_rss_gib: float  # ru_maxrss of the child (and its waited-for descendants)
    peak_anon_gib: float  # sampled max of RssAnon over the child's process tree
    peak_file_gib: float  # sampled max of RssFile (page-cache pages mapped into the tree)
    cpu_s: float  # user + system
    output_gb: float
    log: str


def command(runner: str, ckpt: Path, out: Path, precision: str, cache: Path, algo: str = "rtn",
            block_size: int = 32) -> list[str]:
    """The child command line for one export."""
    if runner == "phi-onnx":
        return [sys.executable, "-c", PHI_ONNX_CHILD, str(ckpt), str(out), precision, algo, str(block_size)]
    return [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(ckpt), "-o", str(out),
            "-p", precision, "-e", "cpu", "-c", str(cache)]


def _tree(pid: int) -> list[int]:
    """`pid` and its descendants (via /proc/PID/task/TID/children)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as handle:
                    todo.extend(int(c) for c in handle.read().split())
        except OSError:
            continue
    return found


def _rss_kib(pids: list[int]) -> tuple[int, int]:
    """Summed (RssAnon, RssFile) in KiB over `pids`."""
    anon = file = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as handle:
                for line in handle:
                    if line.startswith("RssAnon:"):
                        anon += int(line.split()[1])
                    elif line.startswith("RssFile:"):
                        file += int(line.split()[1])
        except OSError:
            continue
    return anon, file


def measure(argv: list[str], log: Path, timeout: float, interval: float = 0.2) -> dict[str, float | str]:
    """Run `argv`, sampling its memory; returns status, wall, peak RSS (GiB) and CPU time."""
    started = time.perf_counter()
    with log.open("wb") as sink:
        # Own session, so a timeout can stop the whole tree; output goes to the log.
        pid = os.posix_spawn(argv[0], argv, dict(os.environ, PYTHONUNBUFFERED="1"),
                             file_actions=[(os.POSIX_SPAWN_DUP2, sink.fileno(), 1),
                                           (os.POSIX_SPAWN_DUP2, sink.fileno(), 2)],
                             setsid=True)
    peak_anon = peak_file = 0
    timed_out = False
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            break
        anon, file = _rss_kib(_tree(pid))
        peak_anon, peak_file = max(peak_anon, anon), max(peak_file, file)
        if time.perf_counter() - started > timeout and not timed_out:
            timed_out = True
            os.killpg(pid, signal.SIGKILL)
        time.sleep(interval)
    wall = time.perf_counter() - started
    if timed_out:
        state = "timeout"
    elif os.WIFSIGNALED(status):
        sig = signal.Signals(os.WTERMSIG(status)).name
        state = f"killed by {sig}" + (" (OOM?)" if sig == "SIGKILL" else "")
    else:
        code = os.WEXITSTATUS(status)
        state = "ok" if code == 0 else f"exit {code}"
    return {"status": state, "wall_s": wall, "peak_rss_gib": usage.ru_maxrss * 1024 / GIB,
            "peak_anon_gib": peak_anon * 1024 / GIB, "peak_file_gib": peak_file * 1024 / GIB,
            "cpu_s": usage.ru_utime + usage.ru_stime}


def folder_bytes(folder: Path) -> int:
    """Total size of the files under `folder` (0 if missing)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0


def warm_page_cache(ckpt: Path) -> None:
    """Read the weights once so the first runner does not pay for a cold page cache alone."""
    for file in sorted(ckpt.glob("*.safetensors")):
        with file.open("rb") as handle:
            while handle.read(64 * 1024 * 1024):
                pass


def run(ckpt: Path, work: Path, runners: list[str], precisions: list[str], repeats: int,
        timeout: float, keep: bool, algos: tuple[str, ...] = ("rtn",), block_size: int = 32) -> list[Result]:
    """Every (precision, repeat, algo, runner) export in turn (algorithms take turns within a repeat, so each
    repeat is a pair on the same machine); outputs are deleted unless `keep`."""
    results = []
    work.mkdir(parents=True, exist_ok=True)
    for precision in precisions:
        for repeat, algo in [(r, a) for r in range(repeats) for a in (algos if precision == "int4" else ("-",))]:
            order = runners if repeat % 2 == 0 else runners[::-1]
            for runner in [r for r in order if runner_has(r, algo)]:
                tag = precision if algo == "-" else f"{precision}-{algo}"
                out = work / f"{ckpt.name}-{runner}-{tag}"
                cache = work / f"cache-{runner}"
                log = work / f"{ckpt.name}-{runner}-{tag}-{repeat}.log"
                shutil.rmtree(out, ignore_errors=True)
                print(f"[{time.strftime('%H:%M:%S')}] {runner} {tag} #{repeat} ...", file=sys.stderr,
                      flush=True)
                argv = command(runner, ckpt, out, precision, cache, "rtn" if algo == "-" else algo, block_size)
                stats = measure(argv, log, timeout)
                result = Result(runner, precision, algo, repeat, output_gb=folder_bytes(out) / 1e9, log=str(log),
                                **stats)  # type: ignore[arg-type]
                print(f"    {result.status}: {result.wall_s:.1f} s, peak RSS {result.peak_rss_gib:.2f} GiB",
                      file=sys.stderr, flush=True)
                results.append(result)
                if not keep:
                    shutil.rmtree(out, ignore_errors=True)
                shutil.rmtree(cache, ignore_errors=True)
    return results


def runner_has(runner: str, algo: str) -> bool:
    """Whether `runner` can export with int4 algorithm `algo` (the builder has round-to-nearest only)."""
    return runner == "phi-onnx" or algo in ("-", "rtn")


def table(results: list[Result]) -> str:
    """A fixed-width text table of the results."""
    head = (f"{'runner':<9} {'prec':<5} {'algo':<5} {'#':>2} {'status':<12} {'wall s':>8} {'peak RSS GiB':>13} "
            f"{'anon GiB':>9} {'file GiB':>9} {'CPU s':>8} {'out GB':>7}")
    rows = [head, "-" * len(head)]
    for r in results:
        rows.append(f"{r.runner:<9} {r.precision:<5} {r.algo:<5} {r.repeat:>2} {r.status:<12.12} {r.wall_s:>8.1f} "
                    f"{r.peak_rss_gib:>13.2f} {r.peak_anon_gib:>9.2f} {r.peak_file_gib:>9.2f} "
                    f"{r.cpu_s:>8.1f} {r.output_gb:>7.2f}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", type=Path, required=True, help="checkpoint folder to export")
    parser.add_argument("--runners", default=",".join(RUNNERS), help=f"comma-separated subset of {RUNNERS}")
    parser.add_argument("--precisions", default=",".join(PRECISIONS), help=f"comma-separated: {PRECISIONS}")
    parser.add_argument("--algos", default="rtn", help=f"comma-separated int4 algorithms: {ALGOS}")
    parser.add_argument("--block-size", type=int, default=32, help="int4 block size")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--work", type=Path, default=Path("/tmp/phi-bench/exports"),
                        help="where outputs and logs go")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds before an export is killed")
    parser.add_argument("--keep", action="store_true", help="keep the exported folders")
    parser.add_argument("--no-warm", action="store_true", help="skip reading the weights once beforehand")
    parser.add_argument("--json", type=Path, help="write the results here as JSON")
    args = parser.parse_args(argv)
    runners = [r for r in args.runners.split(",") if r]
    precisions = [p for p in args.precisions.split(",") if p]
    algos = tuple(a for a in args.algos.split(",") if a)
    unknown = set(runners) - set(RUNNERS) | set(precisions) - set(PRECISIONS) | set(algos) - set(ALGOS)
    if unknown:
        parser.error(f"unknown runner, precision or algorithm: {', '.join(sorted(unknown))}")
    ckpt = args.ckpt.resolve()
    if not args.no_warm:
        warm_page_cache(ckpt)
    results = run(ckpt, args.work, runners, precisions, args.repeats, args.timeout, args.keep, algos, args.block_size)
    print(table(results))
    if args.json:
        config = json.loads((ckpt / "config.json").read_text())
        payload = {"checkpoint": str(ckpt), "checkpoint_gb": folder_bytes(ckpt) / 1e9,
                   "layers": config["num_hidden_layers"], "hidden": config["hidden_size"],
                   "cpus": os.cpu_count(), "results": [asdict(r) for r in results]}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
