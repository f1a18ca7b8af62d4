"""`phi-onnx serve MODEL`: the OpenAI-compatible server (added to the CLI group in phi_onnx/cli/__init__.py)."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import ipaddress
import logging
import math
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import click

from phi_onnx.cli.errors import user_errors
from phi_onnx.cli.options import THREADS, FiniteFloat
from phi_onnx.errors import PhiOnnxError
from phi_onnx.export.options import PRECISIONS
from phi_onnx.serve.config import DEFAULTS, ServeConfig

SERVE_EXTRA = 'Serving needs FastAPI and uvicorn: pip install "phi-onnx[serve]".'


def _replicas(value: str | None) -> int | str | None:
    if value is None or value == "auto":
        return value
    if value.isdigit() and int(value) >= 1:
        return int(value)
    raise click.BadParameter(f"{value!r} is neither a positive integer nor 'auto'.")


class ListenError(PhiOnnxError):
    """The server cannot listen on --host/--port (port in use, no such address, no permission)."""


def _listen(host: str, port: int) -> list[socket.socket]:
    """Listen on host:port (every address a host name has) before anything slow, so a busy port is one
    sentence and exit 2 rather than uvicorn's [Errno 98] after the model has loaded. uvicorn serves on
    these sockets; a client that connects before it starts waits in the backlog until then.

    They listen at once: two servers bound with SO_REUSEADDR but not yet listening would both pass."""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        raise ListenError(f"Cannot listen on {where}: the host name does not resolve ({error.strerror}).") from None
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(addresses):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: restart over TIME_WAIT
            if family == socket.AF_INET6:  # as asyncio: "::" and "0.0.0.0" are separate listeners
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(2048)  # uvicorn's default backlog
    except OSError as error:
        for sock in sockets:
            sock.close()
        reason = {errno.EADDRINUSE: "the port is already in use (another server?); stop it or pick another "
                                    "with --port",
                  errno.EADDRNOTAVAIL: "this machine has no such address; use --host 127.0.0.1 (this machine "
                                       "only) or 0.0.0.0 (every address)",
                  errno.EACCES: "permission denied (ports below 1024 need privileges); pick another with "
                                "--port"}.get(error.errno, error.strerror or str(error))
        raise ListenError(f"Cannot listen on {where}: {reason}.") from None
    return sockets


class _Seconds(click.FloatRange):
    """A finite number of seconds (FloatRange lets nan through: every comparison with it is false)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number of seconds.", param, ctx)
        return number


def _names(values: tuple[str, ...]) -> list[str]:
    """Repeatable options that also take comma-separated lists."""
    return [item.strip() for value in values for item in value.split(",") if item.strip()]


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@click.command()
@click.argument("model")
@click.option("--host", default=DEFAULTS.host, show_default=True, help="Address to listen on (0.0.0.0: every one).")
@click.option("--port", type=click.IntRange(0, 65535), default=DEFAULTS.port, show_default=True)
@click.option("--api-key", envvar="PHI_ONNX_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' on /v1 and /metrics (env PHI_ONNX_API_KEY).")
@click.option("--max-batch", type=click.IntRange(1, 256), default=DEFAULTS.max_batch, show_default=True,
              help="KV slots: requests decoded together.")
@click.option("--max-queue", type=click.IntRange(min=0), default=DEFAULTS.max_queue, show_default=True,
              help="Requests waiting for a slot; more get 503 with Retry-After.")
@click.option("--max-context", type=click.IntRange(min=2), default=None,
              help="Tokens per slot, prompt + reply (default: the export's max_length).")
@click.option("--model-name", multiple=True,
              help="Model id clients use (default: the folder's name); repeat it for aliases (the first is the "
                   "main id; /v1/models lists all, and `model` may be any).")
@click.option("--max-adapters", type=click.IntRange(min=1), default=None,
              help="Switchable LoRA adapters kept loaded at once (least recently used dropped, read again on "
                   "demand; default: all).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--precision", type=click.Choice(PRECISIONS), default=None,
              help="When MODEL is a name: the precision to export it in (default int4).")
@click.option("--revision", default=None, help="When MODEL is a hub id: the revision to export.")
@click.option("--threads", type=THREADS, default=None,
              help="Intra-op threads (default: one per physical core).")
@click.option("--grace", type=_Seconds(min=0), default=DEFAULTS.grace, show_default=True,
              help="Seconds running streams get to finish on Ctrl-C / SIGTERM.")
@click.option("--replicas", default=None, help="Ray Serve: replicas (an integer or 'auto').")
@click.option("--min-replicas", type=click.IntRange(min=0), default=None, help="Ray Serve: autoscaling minimum.")
@click.option("--max-replicas", type=click.IntRange(min=1), default=None, help="Ray Serve: autoscaling maximum.")
@click.option("--gpus-per-replica", type=FiniteFloat(min=0), default=None, help="Ray Serve: GPUs per replica.")
@click.option("--ray-address", default=None, help="Ray Serve: the cluster to join (default: start a local one).")
@click.option("--allowed-hosts", multiple=True, metavar="NAMES",
              help="Host names (or name:port) served besides localhost, 127.0.0.1, [::1] and --host; repeatable "
                   "or comma-separated; '*' serves any (other Hosts get 403: DNS rebinding).")
@click.option("--cors-origins", multiple=True, metavar="ORIGINS",
              help="Web origins (https://app.example) whose pages may call the API from a browser; repeatable or "
                   "comma-separated; '*' allows any. Off by default: requests from other sites' pages get 403.")
@click.option("--header-timeout", type=_Seconds(min=0, min_open=True), default=DEFAULTS.header_timeout,
              show_default=True,
              help="Seconds a request's headers may take to arrive (408 and disconnect after).")
@click.option("--body-timeout", type=_Seconds(min=0, min_open=True), default=DEFAULTS.body_timeout, show_default=True,
              help="Seconds a request's body may take to arrive (408 after).")
@click.option("--max-connections", type=click.IntRange(min=1), default=DEFAULTS.max_connections, show_default=True,
              help="Open connections served at once; requests on more get 503 with Retry-After.")
@click.option("--prefix-cache/--no-prefix-cache", default=DEFAULTS.prefix_cache, show_default=True,
              help="Reuse prompt prefixes across requests (finished requests' slots, and a store of prefixes).")
@click.option("--prefix-cache-bytes", type=click.IntRange(min=0), default=None,
              help="Bytes the prefix store may hold beyond the slots (default: a fifth of the memory available; "
                   "0: the slots only).")
@click.option("--stall-factor", type=FiniteFloat(min=0, min_open=True, max=1000),
              default=DEFAULTS.stall_factor, show_default=True,
              help="While streams decode, a newcomer's prefill takes about this many decode steps per step "
                   "(higher: sooner first tokens, longer pauses in running streams).")
@click.option("--cohort-tokens", type=click.IntRange(min=0), default=DEFAULTS.cohort_tokens, show_default=True,
              help="Cold prompts arriving together while nothing streams are prefilled back to back and start "
                   "decoding together, up to this many prompt tokens (throughput; the first streams pause once "
                   "after their first token). 0: each starts as soon as its prompt is in.")
@user_errors
def serve(model: str, host: str, port: int, api_key: str | None, max_batch: int, max_queue: int,
          max_context: int | None, model_name: tuple[str, ...], max_adapters: int | None, device: str,
          precision: str | None, revision: str | None, threads: int | None, grace: float,
          replicas: str | None, min_replicas: int | None, max_replicas: int | None,
          gpus_per_replica: float | None, ray_address: str | None, allowed_hosts: tuple[str, ...],
          cors_origins: tuple[str, ...], header_timeout: float, body_timeout: float, max_connections: int,
          prefix_cache: bool, prefix_cache_bytes: int | None, stall_factor: float, cohort_tokens: int) -> None:
    """Serve MODEL with OpenAI's API (/v1/chat/completions, /v1/completions) and a chat page at /.

    MODEL is an export folder, or a short name, hub id or checkpoint folder, exported once into the local
    store (see `phi-onnx list`). Requests are batched continuously: each joins the running batch at the next step.
    """
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        click.echo(f"Error: {SERVE_EXTRA}", err=True)
        sys.exit(2)
    from phi_onnx.serve.schema import check_api_key
    from phi_onnx.serve.security import allowed_host_set, cors_origin_set

    check_api_key(api_key)
    hosts = _names(allowed_hosts)
    if host not in ("0.0.0.0", "::", ""):  # the name it listens on is its own (a wildcard address is no name)
        hosts.append(host)
    origins = _names(cors_origins)
    allowed_host_set(hosts)  # a bad entry is an error now, before the model loads
    cors_origin_set(origins)
    names = list(dict.fromkeys(model_name))  # the first is the main id; repeats are said once
    config = ServeConfig(max_batch=max_batch, max_queue=max_queue, api_key=api_key,
                         model_name=names[0] if names else None, model_aliases=tuple(names[1:]),
                         max_adapters=max_adapters,
                         capacity=max_context, allowed_hosts=tuple(hosts), cors_origins=tuple(origins),
                         body_timeout=body_timeout, host=host, port=port, grace=grace,
                         header_timeout=header_timeout, max_connections=max_connections, prefix_cache=prefix_cache,
                         prefix_cache_bytes=prefix_cache_bytes, stall_factor=stall_factor,
                         cohort_tokens=cohort_tokens)
    sockets = _listen(host, port)  # before the model is exported or loaded
    click.get_current_context().call_on_close(lambda: [sock.close() for sock in sockets])
    if not _loopback(host) and not api_key:
        click.echo(f"Warning: listening on {host} without --api-key: anyone who can reach this port can use "
                   "the model.", err=True)
    from phi_onnx.store import resolve_model

    folder = str(resolve_model(model, device=device, precision=precision, revision=revision,
                               notify=lambda line: click.echo(line, err=True), progress=sys.stderr.isatty()))
    if not names and Path(folder) != Path(model):
        # A store entry's folder is named by its id; clients know the name.
        config = dataclasses.replace(config, model_name=model)
    ray_given = [replicas, min_replicas, max_replicas, gpus_per_replica, ray_address]
    if any(v is not None for v in ray_given):
        try:
            from phi_onnx.cli.serve_ray import serve_cluster
        except ImportError:
            click.echo('Error: Ray support is not installed: pip install "phi-onnx[serve,ray]".', err=True)
            sys.exit(2)
        scaling = min_replicas is not None or max_replicas is not None
        for sock in sockets:  # Ray's proxy binds the port itself: the check above was all they were for
            sock.close()
        serve_cluster(folder, config, replicas=_replicas(replicas) or ("auto" if scaling else 1),
                      min_replicas=min_replicas, max_replicas=max_replicas, gpus_per_replica=gpus_per_replica or 0.0,
                      ray_address=ray_address, device=device, threads=threads)
        return

    import phi_onnx
    from phi_onnx.runtime.folder import read_folder
    from phi_onnx.serve import create_app
    from phi_onnx.serve.config import fit_pool

    checked = read_folder(folder)  # a bad folder, device or pool size is an error now, not a failed /health later
    config = fit_pool(checked, config, device, warn=lambda line: click.echo(f"Warning: {line}", err=True))
    logger = logging.getLogger("phi_onnx")
    if not logger.handlers and not logging.getLogger().handlers:
        logging.basicConfig(format="%(levelname)s: %(message)s")
    logger.setLevel(min(logger.getEffectiveLevel(), logging.INFO))

    def load() -> phi_onnx.Model:
        return phi_onnx.load(folder, device=device, backend="ort", threads=threads)

    app = create_app(load, config)
    bound = sockets[0].getsockname()[1]  # the port --port 0 got
    url = f"http://[{host}]:{bound}" if ":" in host else f"http://{host}:{bound}"
    click.echo(f"Serving {checked.path} on {url} (OpenAI API under /v1, chat page at /); Ctrl-C stops.", err=True)
    from phi_onnx.serve.server import Limits, server

    limits = Limits(header_timeout=header_timeout, max_connections=max_connections)
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then raises the signal again: after a clean
    # shutdown that is a normal exit, not an interruption.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with contextlib.suppress(KeyboardInterrupt):
        server(app, host=host, port=bound, grace=grace, limits=limits, url=url).run(sockets=sockets)
