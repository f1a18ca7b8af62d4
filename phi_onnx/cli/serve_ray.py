"""`phi-onnx serve --replicas ...`: the Ray Serve driver (deploy, print the address, wait for Ctrl-C, tear down).

The deployment itself is `phi_onnx.serve.ray`; this module is the command's side of it.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

import click

from phi_onnx.errors import PhiOnnxError
from phi_onnx.serve.config import ServeConfig
from phi_onnx.serve.ray import (
    check_export,
    check_export_on_nodes,
    check_resources,
    deployment,
    deployment_options,
    keep_local_ray_on_loopback,
    replicas_for_cluster,
    require_ray,
)
from phi_onnx.serve.ray.options import describe, replica_count


def serve_cluster(model_path: str, config: ServeConfig, *, replicas: int | str, min_replicas: int | None,
                  max_replicas: int | None, gpus_per_replica: float, ray_address: str | None,
                  device: str | None = None, threads: int | None = None, backend: str | None = None,
                  cpus_per_replica: float | None = None) -> None:
    """`phi-onnx serve` under Ray: deploy, print the address, serve until Ctrl-C / SIGTERM, then tear down.

    Without `ray_address` a local Ray is started with every listener on 127.0.0.1 (the proxy on
    `config.host:config.port`); with one (`auto` or `HOST:6379`) the deployment joins that cluster.
    `config` holds `create_app`'s options (each replica sizes its KV pool on its node, as `phi-onnx serve`
    does); `device`, `threads`, `backend` go to `phi_onnx.load`; `cpus_per_replica` defaults to `threads`, else 1.

    Raises:
        PhiOnnxError: Ray is missing, the folder is not an export, an option is invalid, the cluster
            lacks the GPUs/CPUs asked for, or the replicas fail to start.
    """
    path = check_export(model_path) if ray_address is None else Path(model_path)  # a cluster: checked on its nodes
    host, port = config.host, config.port
    cpus = float(cpus_per_replica or threads or 1)  # reserve the cores it will use
    autoscale = replica_count(replicas) is None or min_replicas is not None or max_replicas is not None
    fill_max = autoscale and max_replicas is None  # --replicas auto alone: as many as the cluster can place

    def options_for(max_count: int | None) -> dict[str, Any]:
        return deployment_options(replicas=replicas, min_replicas=min_replicas, max_replicas=max_count,
                                  gpus_per_replica=gpus_per_replica, cpus_per_replica=cpus,
                                  max_batch=config.max_batch, max_queue=config.max_queue)

    options_for(max(min_replicas or 1, 1) if fill_max else max_replicas)  # invalid options fail before Ray starts
    ray = require_ray()
    if ray_address is None:
        keep_local_ray_on_loopback()
    from ray import serve

    # "local": a new single-machine Ray even when RAY_ADDRESS names a cluster (whose Serve we would shut down)
    ray.init(address=ray_address or "local", include_dashboard=False if ray_address is None else None,
             log_to_driver=False)
    try:
        cluster = ray.cluster_resources()
        if fill_max:
            max_replicas = max(min_replicas or 1, replicas_for_cluster(cluster, gpus_per_replica, cpus))
        options = options_for(max_replicas)
        check_resources(cluster, options)
        if ray_address is not None:
            check_export_on_nodes(path, gpus_per_replica=gpus_per_replica)
        app_options = config.app_options()
        for key in ("max_batch", "max_queue", "api_key", "model_name", "max_adapters"):
            del app_options[key]  # deployment's own arguments
        app = deployment(path, replicas=replicas, min_replicas=min_replicas, max_replicas=max_replicas,
                         gpus_per_replica=gpus_per_replica, cpus_per_replica=cpus, threads=threads, device=device,
                         backend=backend, max_batch=config.max_batch, max_queue=config.max_queue,
                         api_key=config.api_key, model_name=config.model_name,
                         max_adapters=config.max_adapters, app_options=app_options,
                         check_folder=ray_address is None)
        serve.start(http_options={"host": host, "port": port})
        try:
            serve.run(app, name="phi-onnx", route_prefix="/")
        except RuntimeError as error:  # Serve reports a replica's failed constructor this way
            raise PhiOnnxError(f"The deployment failed to start: {error}",
                               hint="Check that the export exists at the same path on every node.") from None
        click.echo(f"Serving {path} on http://{host}:{port} (OpenAI API under /v1; Ray Serve, {describe(options)}); "
                   "Ctrl-C stops.", err=True)
        _wait_for_stop()
        click.echo("Stopping the deployment.", err=True)
    finally:
        if ray_address is None:
            serve.shutdown()
        else:
            serve.delete("phi-onnx")
        ray.shutdown()




def _wait_for_stop() -> None:
    """Block until SIGINT or SIGTERM."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop.wait(1.0):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
