"""The replica: each loads the export, sizes its KV pool on its node and serves `create_app`'s app."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from functools import cache
from pathlib import Path
from typing import Any

from phi_onnx.errors import OptionsError
from phi_onnx.serve.config import APP_FIELDS, DEFAULTS, ServeConfig, fit_pool
from phi_onnx.serve.ray.grpc_bind import bind_replica_grpc_to_node_ip
from phi_onnx.serve.ray.nodes import check_export
from phi_onnx.serve.ray.options import HEALTH_TIMEOUT_S, deployment_options, replica_settings, require_ray

log = logging.getLogger(__name__)


def deployment(folder: str | os.PathLike[str], *, replicas: int | str = 1, min_replicas: int | None = None,
               max_replicas: int | None = None, gpus_per_replica: float = 0.0, cpus_per_replica: float = 1.0,
               threads: int | None = None, max_batch: int = DEFAULTS.max_batch,
               max_queue: int = DEFAULTS.max_queue, api_key: str | None = None,
               model_name: str | None = None, max_adapters: int | None = None, device: str | None = None,
               backend: str | None = None, target_ongoing_requests: float | None = None, name: str = "phi-onnx",
               app_options: dict[str, Any] | None = None, check_folder: bool = True) -> Any:
    """A Ray Serve application serving the export in `folder` with the OpenAI API of `phi-onnx serve`.

    Pass it to `serve.run(...)`, or compose it into your own Serve application. Every replica loads
    `folder` (which must exist at the same path on every node), so check it is there on each node.

    Args:
        folder: an export written by `phi-onnx export`.
        replicas: a fixed count, or "auto" (autoscaling between min_replicas and max_replicas).
        min_replicas, max_replicas: the autoscaling range (either one turns autoscaling on).
        gpus_per_replica: GPUs each replica reserves (0: CPU replicas); the replica then runs on CUDA.
        cpus_per_replica: CPUs each replica reserves; also its ONNX Runtime threads unless `threads`.
        threads: ONNX Runtime intra-op threads per replica.
        max_batch, max_queue, api_key, model_name: as for `phi_onnx.serve.create_app`.
        max_adapters: switchable LoRA adapters each replica keeps loaded (None: all; see `ServeConfig`).
            Every replica serves the export's adapters (`model` selects one, /v1/models lists them).
        device, backend: override `phi_onnx.load`'s choice (default: cuda with GPUs, else cpu).
        target_ongoing_requests: autoscaling target per replica (default: max_batch).
        name: the Serve deployment's name.
        app_options: further keyword arguments for `create_app`.
        check_folder: check `folder` here first (False when only the replicas' nodes hold it; see
            `check_export_on_nodes`).

    Raises:
        PhiOnnxError: Ray is not installed, the folder is not an export, or an option is invalid.
    """
    require_ray()
    path = check_export(folder) if check_folder else Path(folder)
    options = deployment_options(replicas=replicas, min_replicas=min_replicas, max_replicas=max_replicas,
                                 gpus_per_replica=gpus_per_replica, cpus_per_replica=cpus_per_replica,
                                 max_batch=max_batch, max_queue=max_queue,
                                 target_ongoing_requests=target_ongoing_requests, name=name)
    load = replica_settings(gpus_per_replica=gpus_per_replica, cpus_per_replica=cpus_per_replica, threads=threads,
                            device=device, backend=backend)
    app = {**(app_options or {}), "max_batch": max_batch, "max_queue": max_queue, "api_key": api_key,
           "model_name": model_name}
    if max_adapters is not None:  # else app_options' (or the default: all)
        app["max_adapters"] = max_adapters
    return replica_class().options(**options).bind(str(path), load, app)


def app_builder(args: dict[str, Any]) -> Any:
    """Entry point for a Serve config file: `import_path: phi_onnx.serve.ray:app_builder`.

    `args` holds `folder` and any keyword argument of `deployment` (see examples/ray/serve_config.yaml).
    Without `api_key` in `args`, the environment's PHI_ONNX_API_KEY is used (e.g. from a Kubernetes Secret).
    """
    args = dict(args)
    if "folder" not in args:
        raise OptionsError("The Serve config's args need `folder: /path/to/export`.")
    args.setdefault("api_key", os.environ.get("PHI_ONNX_API_KEY") or None)
    return deployment(args.pop("folder"), **args)


def replica_config(folder: str, load_options: dict[str, Any], app_options: dict[str, Any]) -> ServeConfig:
    """The replica's ServeConfig, its KV pool sized on this node as `phi-onnx serve` sizes it (`fit_pool`):
    slots left to the export's max_length are shortened to fit this node's memory (logged), and a pool
    that cannot fit fails the replica's start with the reason."""
    from phi_onnx.runtime.folder import read_folder

    unknown = sorted(set(app_options) - set(APP_FIELDS))
    if unknown:  # as create_app refuses them (a listener option such as host is the proxy's, not the app's)
        raise TypeError(f"create_app() got unexpected keyword arguments: {', '.join(unknown)}")
    config = ServeConfig.of(**app_options)
    return fit_pool(read_folder(folder), config, load_options.get("device") or "auto", warn=log.warning,
                    hint="Lower max_batch or capacity (app_options), or give each replica more memory.")


@cache
def replica_class() -> Any:
    """The Serve deployment class (built on first use, so that importing this module needs no Ray)."""
    from ray import serve

    @serve.deployment
    @serve.ingress()
    class PhiOnnxReplica:
        """One model copy: the single-process server's app, named by its replica id on every response."""

        def __init__(self, folder: str, load_options: dict[str, Any], app_options: dict[str, Any]) -> None:
            import phi_onnx
            from phi_onnx.serve import create_app

            bind_replica_grpc_to_node_ip()  # before Serve opens this replica's gRPC server
            replica = serve.get_replica_context().replica_id.unique_id
            config = replica_config(folder, load_options, app_options)
            # Loaded here, not in the app's background: Serve counts the replica ready once this returns.
            model = phi_onnx.load(folder, **load_options)
            self.phi_app = create_app(model, dataclasses.replace(config, replica_name=replica))

        def __serve_build_asgi_app__(self) -> Any:
            return self.phi_app

        async def check_health(self) -> None:
            """Serve's health check: a one-token generation, so the engine and scheduler still answer."""
            await probe(self.phi_app)

    return PhiOnnxReplica


async def probe(app: Any, timeout: float = HEALTH_TIMEOUT_S - 5) -> None:
    """Generate one greedy token through `app`'s own scheduler; raise when it cannot.

    The probe goes to the scheduler (not an HTTP route) so it stays out of the request metrics. A full
    queue means the replica is busy, not broken.
    """
    from phi_onnx.runtime.scheduler import QueueFullError

    state = getattr(app.state, "phi_onnx", None)
    if state is None or state.scheduler is None:
        raise RuntimeError("health probe: the app has no running scheduler")
    model, scheduler = state.model, state.scheduler
    options = dataclasses.replace(model.defaults, max_new_tokens=1, temperature=0.0)
    try:
        request = scheduler.submit([model.folder.bos_token_id or 0], options)
    except QueueFullError:
        return
    try:
        tokens, finish = await asyncio.wait_for(asyncio.to_thread(request.result), timeout)
    except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
        request.cancel()
        raise RuntimeError(f"health probe: no token in {timeout:g} s") from None
    if finish.reason == "error" or len(tokens) != 1:
        raise RuntimeError(f"health probe: one-token generation ended {finish.reason!r}: {finish.error}")
