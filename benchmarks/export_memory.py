"""Export wall time and peak memory: phi-onnx versus onnxruntime-genai's model builder.

Each export runs in a fresh child process, one at a time, runners alternating. Peak RSS is the
kernel's high-water mark for the child (``os.wait4``'s ``ru_maxrss``, which counts file-backed
pages such as memory-mapped weights too); the child's anonymous and file-backed RSS are also
sampled from ``/proc`` to tell them apart. A child killed by a signal (the OOM killer sends
SIGKILL) or stopped at ``--timeout`` is recorded as such, not retried.

    python benchmarks/export_memory.py --ckpt /tmp/phi-bench/phi3-mini --json results.json
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
GIB = 1024**3

PHI_ONNX_CHILD = """
import sys
from phi_onnx.export import ExportOptions, export
export(sys.argv[1], sys.argv[2], ExportOptions(precision=sys.argv[3]), overwrite=True)
"""


@dataclass
class Result:
    """One export: what ran and what it cost."""

    runner: str
    precision: str
    repeat: int
    status: str  # "ok", "exit N", "killed by SIGKILL (OOM?)", "timeout"
    wall_s: float
    peak_rss_gib: float  # ru_maxrss of the child (and its waited-for descendants)
    peak_anon_gib: float  # sampled max of RssAnon over the child's process tree
    peak_file_gib: float  # sampled max of RssFile (page-cache pages mapped into the tree)
    cpu_s: float  # user + system
    output_gb: float
    log: str


def command(runner: str, ckpt: Path, out: Path, precision: str, cache: Path) -> list[str]:
    """The child command line for one export."""
    if runner == "phi-onnx":
        return [sys.executable, "-c", PHI_ONNX_CHILD, str(ckpt), str(out), precision]
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
        timeout: float, keep: bool) -> list[Result]:
    """Every (precision, repeat, runner) export in turn; outputs are deleted unless `keep`."""
    results = []
    work.mkdir(parents=True, exist_ok=True)
    for precision in precisions:
        for repeat in range(repeats):
            order = runners if repeat % 2 == 0 else runners[::-1]
            for runner in order:
                out = work / f"{ckpt.name}-{runner}-{precision}"
                cache = work / f"cache-{runner}"
                log = work / f"{ckpt.name}-{runner}-{precision}-{repeat}.log"
                shutil.rmtree(out, ignore_errors=True)
                print(f"[{time.strftime('%H:%M:%S')}] {runner} {precision} #{repeat} ...", file=sys.stderr,
                      flush=True)
                stats = measure(command(runner, ckpt, out, precision, cache), log, timeout)
                result = Result(runner, precision, repeat, output_gb=folder_bytes(out) / 1e9, log=str(log),
                                **stats)  # type: ignore[arg-type]
                print(f"    {result.status}: {result.wall_s:.1f} s, peak RSS {result.peak_rss_gib:.2f} GiB",
                      file=sys.stderr, flush=True)
                results.append(result)
                if not keep:
                    shutil.rmtree(out, ignore_errors=True)
                shutil.rmtree(cache, ignore_errors=True)
    return results


def table(results: list[Result]) -> str:
    """A fixed-width text table of the results."""
    head = (f"{'runner':<9} {'prec':<5} {'#':>2} {'status':<12} {'wall s':>8} {'peak RSS GiB':>13} "
            f"{'anon GiB':>9} {'file GiB':>9} {'CPU s':>8} {'out GB':>7}")
    rows = [head, "-" * len(head)]
    for r in results:
        rows.append(f"{r.runner:<9} {r.precision:<5} {r.repeat:>2} {r.status:<12.12} {r.wall_s:>8.1f} "
                    f"{r.peak_rss_gib:>13.2f} {r.peak_anon_gib:>9.2f} {r.peak_file_gib:>9.2f} "
                    f"{r.cpu_s:>8.1f} {r.output_gb:>7.2f}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", type=Path, required=True, help="checkpoint folder to export")
    parser.add_argument("--runners", default=",".join(RUNNERS), help=f"comma-separated subset of {RUNNERS}")
    parser.add_argument("--precisions", default=",".join(PRECISIONS), help=f"comma-separated: {PRECISIONS}")
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
    unknown = set(runners) - set(RUNNERS) | set(precisions) - set(PRECISIONS)
    if unknown:
        parser.error(f"unknown runner or precision: {', '.join(sorted(unknown))}")
    ckpt = args.ckpt.resolve()
    if not args.no_warm:
        warm_page_cache(ckpt)
    results = run(ckpt, args.work, runners, precisions, args.repeats, args.timeout, args.keep)
    print(table(results))
    if args.json:
        config = json.loads((ckpt / "config.json").read_text())
        payload = {"checkpoint": str(ckpt), "checkpoint_gb": folder_bytes(ckpt) / 1e9,
                   "layers": config["num_hidden_layers"], "hidden": config["hidden_size"],
                   "cpus": os.cpu_count(), "results": [asdict(r) for r in results]}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
