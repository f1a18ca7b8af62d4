"""Scale `phi-onnx serve` out on Ray Serve: one replica per GPU (or per CPU share), the same FastAPI app.

Each replica loads the export, builds `phi_onnx.serve.create_app(model, ...)` (the continuous-batching
scheduler, routes, streaming, errors, API key and metrics of the single-process server) and Serve wraps
it with `@serve.ingress`. Serve places replicas by GPU, autoscales them, replaces failed ones and runs
the HTTP proxy that spreads requests over them.

Loopback: on Linux Ray binds its services to the host's network address even for a local cluster,
and Serve 2.60 opens each replica's gRPC server on every interface (`[::]:0`). Local mode therefore
sets `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` (Ray's own switch for "this is not a cluster": every core
service on 127.0.0.1) and every replica's constructor runs `bind_replica_grpc_to_node_ip` before Serve
opens its gRPC server (which then binds the node's Ray address: 127.0.0.1 locally, the node IP in a
cluster). tests/serve/test_ray.py checks every listener of the deployment's processes.

Ray is imported lazily: importing this module never needs it, and every entry point says how to
install it when it is missing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import os
import signal
import sys
import threading
from collections.abc import MutableMapping
from functools import cache
from pathlib import Path
from typing import Any

import click

from phi_onnx.errors import OptionsError, PhiOnnxError

log = logging.getLogger(__name__)

#: The Ray release the loopback setup and the tests were checked on (the `ray` extra pins it).
TESTED_RAY = "2.60.0"
INSTALL_HINT = 'Install Ray Serve with `pip install "phi-onnx[ray]"`.'
#: Ray's switch that keeps a single-machine cluster's services on 127.0.0.1 (read when ray is imported).
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
#: Import paths Ray resolves inside its own processes.
SETUP_HOOK = "phi_onnx.serve.ray.bind_replica_grpc_to_node_ip"  # for your own deployments: see its docstring
PROXY_CALLBACK = "phi_onnx.serve.ray.proxy_middlewares"
PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
REPLICA_HEADER = "x-phi-onnx-replica"  # set by create_app(replica_name=...)
#: Load options a replica passes to `phi_onnx.load`; every other app option goes to `create_app`.
LOAD_KEYS = ("device", "backend", "threads")
HEALTH_PERIOD_S = 10.0
HEALTH_TIMEOUT_S = 60.0  # a probe waits behind a full batch on a busy CPU replica


def require_ray() -> Any:
    """Import Ray Serve, or raise a PhiOnnxError that says how to install it."""
    try:
        import ray
        from ray import serve  # noqa: F401  (ray.serve needs the `serve` extra's packages)
    except ImportError as error:
        raise PhiOnnxError(f"Ray Serve is not installed ({error}).", hint=INSTALL_HINT) from None
    if ray.__version__ != TESTED_RAY:
        log.warning("Ray %s is installed; phi-onnx was tested with Ray %s.", ray.__version__, TESTED_RAY)
    return ray


def deployment_options(*, replicas: int | str = 1, min_replicas: int | None = None,
                       max_replicas: int | None = None, gpus_per_replica: float = 0.0,
                       cpus_per_replica: float = 1.0, max_batch: int = 8, max_queue: int = 64,
                       target_ongoing_requests: float | None = None, name: str = "phi-onnx") -> dict[str, Any]:
    """The Serve deployment options (as `@serve.deployment` and a config file take them) for these settings.

    `replicas` is a count or "auto"; min/max replicas (or "auto") turn on autoscaling, with a target of
    one full batch of ongoing requests per replica unless `target_ongoing_requests` says otherwise.
    `max_ongoing_requests` is each replica's own batch + queue (not Serve's default of 5): Serve sends a
    replica what its queue holds, so a burst spreads over the replicas instead of overflowing the one
    it picked, and keeps the rest at the proxy until one has room. `max_queued_requests` stays unset:
    Serve over-counts queued requests during a burst, so a bound refuses requests replicas could take.

    Raises:
        OptionsError: an option is out of range or the combination is inconsistent.
    """
    if max_batch < 1 or max_queue < 0:
        raise OptionsError(f"max_batch must be >= 1 and max_queue >= 0 (got {max_batch}, {max_queue}).")
    if gpus_per_replica < 0 or cpus_per_replica <= 0:
        raise OptionsError(f"gpus_per_replica must be >= 0 and cpus_per_replica > 0 (got {gpus_per_replica}, "
                           f"{cpus_per_replica}).")
    if gpus_per_replica > 1 and gpus_per_replica != int(gpus_per_replica):
        raise OptionsError(f"gpus_per_replica {gpus_per_replica} is not allowed: above 1 it must be whole.",
                           hint="A replica runs on one GPU; use 1 (or a fraction to share a GPU).")
    initial = _replica_count(replicas)
    options: dict[str, Any] = {
        "name": name,
        "max_ongoing_requests": max_batch + max_queue,
        "health_check_period_s": HEALTH_PERIOD_S,
        "health_check_timeout_s": HEALTH_TIMEOUT_S,
        "ray_actor_options": {"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica},
    }
    if initial is not None and min_replicas is None and max_replicas is None:
        options["num_replicas"] = initial
        return options
    low = 1 if min_replicas is None else min_replicas
    if max_replicas is None:
        raise OptionsError("Autoscaling needs a maximum number of replicas.",
                           hint="Pass --max-replicas N (max_replicas=N) with --replicas auto or --min-replicas.")
    if low < 0 or max_replicas < max(low, 1):
        raise OptionsError(f"Replica range {low}..{max_replicas} is empty or negative.",
                           hint="Use 0 <= --min-replicas <= --max-replicas, with --max-replicas >= 1.")
    if initial is not None and not low <= initial <= max_replicas:
        raise OptionsError(f"--replicas {initial} is outside --min-replicas {low} .. --max-replicas {max_replicas}.")
    autoscaling: dict[str, Any] = {
        "min_replicas": low,
        "max_replicas": max_replicas,
        "target_ongoing_requests": float(target_ongoing_requests or max_batch),
    }
    if initial is not None:
        autoscaling["initial_replicas"] = initial
    options["autoscaling_config"] = autoscaling
    return options


def _replica_count(replicas: int | str) -> int | None:
    """An int for a fixed count, None for "auto"."""
    if isinstance(replicas, str):
        if replicas.strip().lower() == "auto":
            return None
        if not replicas.strip().isdigit():
            raise OptionsError(f"--replicas must be a whole number or 'auto', not {replicas!r}.")
        replicas = int(replicas)
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise OptionsError(f"--replicas must be at least 1 (or 'auto'), not {replicas!r}.")
    return replicas


def replica_settings(*, gpus_per_replica: float = 0.0, cpus_per_replica: float = 1.0, threads: int | None = None,
                     device: str | None = None, backend: str | None = None) -> dict[str, Any]:
    """What each replica passes to `phi_onnx.load`: CUDA when it owns (part of) a GPU, threads = its CPUs.

    Ray sets CUDA_VISIBLE_DEVICES for a replica with GPUs, so its GPU is always `cuda:0` inside it.
    On CPU the ONNX Runtime thread pool is sized to the replica's CPU share, not the whole machine,
    so replicas on one node do not oversubscribe its cores.
    """
    if device in (None, "auto"):  # "auto" could pick a GPU Ray did not give this replica
        device = "cuda" if gpus_per_replica > 0 else "cpu"
    return {"device": device, "backend": backend or "ort",  # the scheduler batches on the ort backend
            "threads": threads if threads is not None else max(1, int(cpus_per_replica))}


def check_export(folder: str | os.PathLike[str]) -> Path:
    """Fail before anything starts when `folder` is not an export (read as the runtime reads it)."""
    from phi_onnx.runtime.folder import read_folder

    return read_folder(folder).path


def check_export_on_nodes(folder: str | os.PathLike[str], *, gpus_per_replica: float = 0.0) -> None:
    """Check `folder` on every alive node that could host a replica (one tiny Ray task per node).

    Raises:
        OptionsError: naming each node where the folder is missing or not an export.
    """
    ray = require_ray()
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0)
    def check(path: str) -> str | None:
        try:
            check_export(path)
        except PhiOnnxError as error:
            return error.message
        return None

    resource = "GPU" if gpus_per_replica > 0 else "CPU"
    nodes = [node for node in ray.nodes() if node["Alive"] and node["Resources"].get(resource, 0) > 0]
    futures = {node["NodeManagerAddress"]: check.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        node["NodeID"], soft=False)).remote(str(folder)) for node in nodes}
    problems = [f"{address}: {message}" for address, message in
                zip(futures, ray.get(list(futures.values()), timeout=120), strict=True) if message]
    if problems:
        raise OptionsError(f"The export {folder} is not usable on {len(problems)} of {len(nodes)} node(s): "
                           + "; ".join(problems),
                           hint="Put the export at the same path on every node (or on a shared file system).")


def deployment(folder: str | os.PathLike[str], *, replicas: int | str = 1, min_replicas: int | None = None,
               max_replicas: int | None = None, gpus_per_replica: float = 0.0, cpus_per_replica: float = 1.0,
               threads: int | None = None, max_batch: int = 8, max_queue: int = 64, api_key: str | None = None,
               model_name: str | None = None, device: str | None = None, backend: str | None = None,
               target_ongoing_requests: float | None = None, name: str = "phi-onnx",
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
            # Loaded here, not in the app's background: Serve counts the replica ready once this returns.
            model = phi_onnx.load(folder, **load_options)
            self.phi_app = create_app(model, replica_name=replica, **app_options)

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


def openai_error(message: str, code: str) -> bytes:
    """An OpenAI-shaped server error body."""
    return json.dumps({"error": {"message": message, "type": "server_error", "param": None, "code": code}}).encode()


REPLICA_FAILED = ("The replica serving this request failed before it finished; the deployment replaces it. "
                  "Retry the request.")
DEPLOYMENT_FULL = "Every replica's batch and queue are full, and so is the proxy's queue (max_queued_requests). " \
                  "Retry later."


class ReplicaFailureErrors:
    """ASGI middleware for Serve's HTTP proxy: its own errors in the OpenAI error shape.

    When a replica dies, Serve's proxy returns without a response (uvicorn would then send a
    plain-text 500) or cuts a stream short; when its queue is full it answers a plain-text 503.
    This answers them with a JSON `server_error` (code `replica_failed`, or `queue_full` with
    Retry-After) and ends a cut event stream with an SSE error event, so OpenAI clients raise a
    clean APIError instead of a parse error or an incomplete read. The app's responses (JSON
    errors included) pass untouched.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state: dict[str, Any] = {"status": None, "replaced": False, "sse": False, "ended": False}

        async def guarded_send(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                kind = dict(message.get("headers", [])).get(b"content-type", b"")
                state["status"] = message["status"]
                state["replaced"] = message["status"] >= 500 and not kind.startswith(b"application/json")
                state["sse"] = kind.startswith(b"text/event-stream")
                if state["replaced"]:
                    return
            elif message["type"] == "http.response.body":
                if state["replaced"]:
                    return  # the plain-text body; the JSON one is sent at the end
                state["ended"] = not message.get("more_body", False)
            await send(message)

        try:
            await self.app(scope, receive, guarded_send)
        except Exception:
            if state["status"] is not None and not state["replaced"] and not state["sse"]:
                raise  # a response is under way and cannot be changed: let uvicorn close it
        if state["status"] is None or state["replaced"]:
            await _send_error(send, state["status"] or 500)
        elif state["sse"] and not state["ended"]:
            event = b"data: " + openai_error(REPLICA_FAILED, "replica_failed") + b"\n\n"
            await send({"type": "http.response.body", "body": event, "more_body": False})


async def _send_error(send: Any, status: int) -> None:
    full = status == 503
    body = openai_error(DEPLOYMENT_FULL, "queue_full") if full else openai_error(REPLICA_FAILED, "replica_failed")
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if full:
        headers.append((b"retry-after", b"1"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def proxy_middlewares() -> list[Any]:
    """Serve's HTTP proxy callback (RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH): phi-onnx's proxy middleware."""
    from starlette.middleware import Middleware

    return [Middleware(ReplicaFailureErrors)]


def bind_replica_grpc_to_node_ip() -> None:
    """Make this process's Serve replica gRPC server bind the node's Ray address, not every interface.

    Serve 2.60 binds it to `[::]:0` (serve/_private/replica.py); the node's Ray address is
    127.0.0.1 for a local cluster and the node IP in a multi-node one, which is what the proxy and
    other replicas dial. phi-onnx's replicas call it in their constructor, which Serve runs before it
    opens that server; for other deployments pass it as the job's
    `runtime_env={"worker_process_setup_hook": SETUP_HOOK}` in `ray.init` (Ray runs job-level hooks only).
    """
    try:
        import ray
        from ray.serve._private import replica
    except ImportError:  # not a Serve worker: nothing to patch
        return
    original = getattr(replica, "add_port_to_grpc_server", None)
    if original is None or getattr(original, "phi_onnx_patched", False):
        if original is None:
            log.warning("Ray %s: cannot bind replica gRPC to the node address (Serve changed).", ray.__version__)
        return

    def add_port(server: Any, address: str) -> int:
        if address.startswith("[::]:"):
            node = ray._private.worker.global_worker.node_ip_address or "127.0.0.1"
            address = f"{f'[{node}]' if ':' in node else node}:{address[len('[::]:'):]}"
        return original(server, address)

    add_port.phi_onnx_patched = True  # type: ignore[attr-defined]
    replica.add_port_to_grpc_server = add_port


def local_environment() -> dict[str, str]:
    """Environment for a local (single machine) Ray started by this process: loopback services,
    the proxy middleware. Set before `import ray`: Ray reads these when it is imported and when its
    processes start (they inherit this process's environment)."""
    return {**LOOPBACK_ENV, PROXY_CALLBACK_ENV: PROXY_CALLBACK}


def keep_local_ray_on_loopback() -> None:
    """Before this process starts a local Ray: every Ray and Serve listener on 127.0.0.1.

    Sets `local_environment()` (unless already set) for the processes Ray starts, and Ray's own
    switch in this process when ray was imported before the variable was set.
    """
    for key, value in local_environment().items():
        os.environ.setdefault(key, value)
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None and os.environ[next(iter(LOOPBACK_ENV))] == "0":
        constants.ENABLE_RAY_CLUSTER = False


def check_resources(cluster: dict[str, float], options: dict[str, Any]) -> None:
    """Refuse a deployment whose replicas the cluster cannot place (they would wait forever).

    Raises:
        OptionsError: too few GPUs or CPUs for the initial (or minimum) number of replicas.
    """
    actor = options["ray_actor_options"]
    scaling = options.get("autoscaling_config")
    count = options["num_replicas"] if scaling is None else scaling.get("initial_replicas", scaling["min_replicas"])
    for resource, each in (("GPU", actor["num_gpus"]), ("CPU", actor["num_cpus"])):
        need = each * count
        have = cluster.get(resource, 0.0)
        if need > have + 1e-9:
            hint = ("Lower --replicas / --min-replicas or --gpus-per-replica, or add GPU nodes to the cluster."
                    if resource == "GPU" else "Lower --replicas or the CPUs per replica, or add nodes.")
            raise OptionsError(f"{count} replica(s) x {each:g} {resource} need {need:g} {resource}s; the Ray cluster "
                               f"has {have:g}.", hint=hint)


def serve_cluster(model_path: str, *, replicas: int | str, min_replicas: int | None, max_replicas: int | None,
                  gpus_per_replica: float, ray_address: str | None, host: str, port: int,
                  app_options: dict[str, Any]) -> None:
    """`phi-onnx serve` under Ray: deploy, print the address, serve until Ctrl-C / SIGTERM, then tear down.

    Without `ray_address` a local Ray is started with every listener on 127.0.0.1 (the proxy on
    `host:port`); with one (`auto` or `HOST:6379`) the deployment joins that cluster.
    `app_options` holds `create_app`'s options plus `threads`, `device`, `backend`, `cpus_per_replica`
    (default: `threads`, else 1).

    Raises:
        PhiOnnxError: Ray is missing, the folder is not an export, an option is invalid, the cluster
            lacks the GPUs/CPUs asked for, or the replicas fail to start.
    """
    path = check_export(model_path) if ray_address is None else Path(model_path)  # a cluster: checked on its nodes
    extra = dict(app_options)
    cpus = float(extra.pop("cpus_per_replica", extra.get("threads") or 1))  # reserve the cores it will use
    autoscale = _replica_count(replicas) is None or min_replicas is not None or max_replicas is not None
    fill_max = autoscale and max_replicas is None  # --replicas auto alone: as many as the cluster can place

    def options_for(max_count: int | None) -> dict[str, Any]:
        return deployment_options(replicas=replicas, min_replicas=min_replicas, max_replicas=max_count,
                                  gpus_per_replica=gpus_per_replica, cpus_per_replica=cpus,
                                  max_batch=extra.get("max_batch", 8), max_queue=extra.get("max_queue", 64))

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
        load = {key: extra.pop(key) for key in LOAD_KEYS if key in extra}
        app = deployment(path, replicas=replicas, min_replicas=min_replicas, max_replicas=max_replicas,
                         gpus_per_replica=gpus_per_replica, cpus_per_replica=cpus, **load,
                         max_batch=extra.pop("max_batch", 8), max_queue=extra.pop("max_queue", 64),
                         api_key=extra.pop("api_key", None), model_name=extra.pop("model_name", None),
                         app_options=extra, check_folder=ray_address is None)
        serve.start(http_options={"host": host, "port": port})
        try:
            serve.run(app, name="phi-onnx", route_prefix="/")
        except RuntimeError as error:  # Serve reports a replica's failed constructor this way
            raise PhiOnnxError(f"The deployment failed to start: {error}",
                               hint="Check that the export exists at the same path on every node.") from None
        click.echo(f"Serving {path} on http://{host}:{port} (OpenAI API under /v1; Ray Serve, {_describe(options)}); "
                   "Ctrl-C stops.", err=True)
        _wait_for_stop()
        click.echo("Stopping the deployment.", err=True)
    finally:
        if ray_address is None:
            serve.shutdown()
        else:
            serve.delete("phi-onnx")
        ray.shutdown()


def _describe(options: dict[str, Any]) -> str:
    scaling = options.get("autoscaling_config")
    count = (f"{options['num_replicas']} replicas" if scaling is None else
             f"{scaling['min_replicas']}..{scaling['max_replicas']} replicas")
    actor = options["ray_actor_options"]
    return f"{count}, {actor['num_gpus']:g} GPU and {actor['num_cpus']:g} CPU each"


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


def replicas_for_cluster(cluster: dict[str, float], gpus_per_replica: float, cpus_per_replica: float) -> int:
    """How many replicas fit a cluster's GPUs (or CPUs for CPU replicas): a default max for --replicas auto."""
    if gpus_per_replica > 0:
        return max(1, math.floor(cluster.get("GPU", 0.0) / gpus_per_replica))
    return max(1, math.floor(cluster.get("CPU", 0.0) / cpus_per_replica))
