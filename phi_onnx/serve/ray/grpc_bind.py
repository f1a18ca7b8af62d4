"""Keeping Ray and Serve listeners off public interfaces: a local Ray on loopback, and each replica's
gRPC server bound to its node's Ray address (Serve 2.60 binds it to every interface)."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from phi_onnx.serve.ray.options import LOOPBACK_ENV, PROXY_CALLBACK, PROXY_CALLBACK_ENV

log = logging.getLogger(__name__)


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
