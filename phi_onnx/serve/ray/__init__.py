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

The package, by concern: `options` (deployment options and their checks), `nodes` (is the export
usable on every node), `replica` (the deployment and each replica's app), `proxy` (the proxy's
middleware), `grpc_bind` (the loopback setup). The CLI's driver is `phi_onnx.cli.serve_ray`.

Ray is imported lazily: importing this package never needs it, and every entry point says how to
install it when it is missing.
"""


from phi_onnx.serve.ray.grpc_bind import bind_replica_grpc_to_node_ip, keep_local_ray_on_loopback, local_environment
from phi_onnx.serve.ray.nodes import check_export, check_export_on_nodes
from phi_onnx.serve.ray.options import (
    HEALTH_PERIOD_S,
    HEALTH_TIMEOUT_S,
    INSTALL_HINT,
    LOAD_KEYS,
    LOOPBACK_ENV,
    PROXY_CALLBACK,
    PROXY_CALLBACK_ENV,
    REPLICA_HEADER,
    SETUP_HOOK,
    TESTED_RAY,
    check_resources,
    deployment_options,
    replica_settings,
    replicas_for_cluster,
    require_ray,
)
from phi_onnx.serve.ray.proxy import (
    DEPLOYMENT_FULL,
    REPLICA_FAILED,
    ReplicaFailureErrors,
    openai_error,
    proxy_middlewares,
)
from phi_onnx.serve.ray.replica import app_builder, deployment, probe, replica_class, replica_config

__all__ = ["DEPLOYMENT_FULL", "HEALTH_PERIOD_S", "HEALTH_TIMEOUT_S", "INSTALL_HINT", "LOAD_KEYS", "LOOPBACK_ENV",
           "PROXY_CALLBACK", "PROXY_CALLBACK_ENV", "REPLICA_FAILED", "REPLICA_HEADER", "SETUP_HOOK", "TESTED_RAY",
           "ReplicaFailureErrors", "app_builder", "bind_replica_grpc_to_node_ip", "check_export",
           "check_export_on_nodes", "check_resources", "deployment", "deployment_options", "keep_local_ray_on_loopback",
           "local_environment", "openai_error", "probe", "proxy_middlewares", "replica_class", "replica_config",
           "replica_settings", "replicas_for_cluster", "require_ray"]
