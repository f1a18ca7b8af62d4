"""Startup time and memory of a local Ray Serve deployment of phi-onnx (loopback only).

    python benchmarks/ray_footprint.py [FOLDER] [--replicas 2]

Without FOLDER the bundled tiny-phi3 is exported to a temporary folder first. Reports the time from
`ray.init` to the first answered request, split into phases, and the memory of every process of the
deployment (the driver, GCS, raylet, agents, Serve controller and proxy, replicas): RSS summed
(counts shared pages once per process) and PSS summed (shares them out: the honest total).
"""

from __future__ import annotations

import argparse
import importlib
import json
import socket
import sys
import tempfile
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

from phi_onnx.serve import ray as pray


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", nargs="?", help="an export (default: tiny-phi3, exported now)")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray")
    args = parser.parse_args()
    scratch = tempfile.TemporaryDirectory()
    folder = args.folder
    if folder is None:
        from phi_onnx import export

        folder = str(Path(scratch.name) / "tiny-phi3")
        export("tiny-phi3", folder)
    pray.keep_local_ray_on_loopback()
    import ray
    from ray import serve

    psutil = importlib.import_module("psutil")  # Ray's bundled copy, on sys.path once ray is imported

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    phases: dict[str, float] = {}
    started = time.perf_counter()
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    phases["ray.init"] = time.perf_counter() - started
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    phases["serve.start"] = time.perf_counter() - started - sum(phases.values())
    app = pray.deployment(folder, replicas=args.replicas, cpus_per_replica=args.cpus / args.replicas)
    serve.run(app, name="phi-onnx", route_prefix="/")
    phases["replicas ready (serve.run)"] = time.perf_counter() - started - sum(phases.values())
    body = json.dumps({"model": Path(folder).name, "prompt": "Once upon a time", "max_tokens": 8}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body,
                                     {"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.status == 200
    phases["first request"] = time.perf_counter() - started - sum(phases.values())
    total = time.perf_counter() - started
    me = psutil.Process()
    rss: dict[str, float] = defaultdict(float)
    pss: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    for process in [me, *me.children(recursive=True)]:
        try:
            name = "driver (this script)" if process.pid == me.pid else _role(process.cmdline())
            info = process.memory_full_info()
        except psutil.Error:
            continue
        rss[name] += info.rss / 2**20
        pss[name] += getattr(info, "pss", info.rss) / 2**20
        count[name] += 1
    print(f"Ray {ray.__version__}, {args.replicas} CPU replicas of {folder}, ray.init(num_cpus={args.cpus})")
    for phase, seconds in phases.items():
        print(f"  {phase:28s} {seconds:6.1f} s")
    print(f"  {'total to first answer':28s} {total:6.1f} s")
    print(f"  {'process':28s} {'n':>3s} {'RSS MiB':>9s} {'PSS MiB':>9s}")
    for name in sorted(rss, key=lambda n: -pss[n]):
        print(f"  {name:28s} {count[name]:3d} {rss[name]:9.0f} {pss[name]:9.0f}")
    print(f"  {'all':28s} {sum(count.values()):3d} {sum(rss.values()):9.0f} {sum(pss.values()):9.0f}")
    serve.shutdown()
    ray.shutdown()
    scratch.cleanup()


def _role(cmdline: list[str]) -> str:
    """ray::ServeReplica, ray::ProxyActor, ... for workers; the program or script name otherwise."""
    if cmdline and cmdline[0].startswith("ray::"):
        return cmdline[0].split(":")[0] + "::" + cmdline[0].split("::")[1].split(":")[0]
    scripts = [Path(part).name for part in cmdline if part.endswith(".py")]
    return scripts[0] if scripts else Path(cmdline[0]).name if cmdline else "?"


if __name__ == "__main__":
    sys.exit(main())
