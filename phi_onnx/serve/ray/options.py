"""Ray Serve deployment options: replicas, autoscaling, resources per replica, and their checks."""

from __future__ import annotations

import logging
import math
from typing import Any

from phi_onnx.errors import OptionsError, PhiOnnxError
from phi_onnx.serve.config import DEFAULTS

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
                       cpus_per_replica: float = 1.0, max_batch: int = DEFAULTS.max_batch,
                       max_queue: int = DEFAULTS.max_queue,
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
    initial = replica_count(replicas)
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


def replica_count(replicas: int | str) -> int | None:
    """An int for a fixed count, None for "auto" (OptionsError for anything else)."""
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


def replicas_for_cluster(cluster: dict[str, float], gpus_per_replica: float, cpus_per_replica: float) -> int:
    """How many replicas fit a cluster's GPUs (or CPUs for CPU replicas): a default max for --replicas auto."""
    if gpus_per_replica > 0:
        return max(1, math.floor(cluster.get("GPU", 0.0) / gpus_per_replica))
    return max(1, math.floor(cluster.get("CPU", 0.0) / cpus_per_replica))


def describe(options: dict[str, Any]) -> str:
    """One line: how many replicas, and what each reserves."""
    scaling = options.get("autoscaling_config")
    count = (f"{options['num_replicas']} replicas" if scaling is None else
             f"{scaling['min_replicas']}..{scaling['max_replicas']} replicas")
    actor = options["ray_actor_options"]
    return f"{count}, {actor['num_gpus']:g} GPU and {actor['num_cpus']:g} CPU each"
