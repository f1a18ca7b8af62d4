"""The serve defaults, written once: `ServeConfig` (read by `phi-onnx serve`, `create_app` and Ray Serve),
and `fit_pool`, the KV-pool sizing every server process applies before it loads the model."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from phi_onnx.errors import OptionsError
from phi_onnx.runtime.defaults import COHORT_TOKENS, MAX_BATCH, MAX_QUEUE, STALL_FACTOR
from phi_onnx.runtime.options import finite_number

if TYPE_CHECKING:
    from phi_onnx.runtime.folder import ModelFolder

#: Options of create_app that are not the listener's (what Ray passes on to each replica).
APP_FIELDS = ("max_batch", "max_queue", "capacity", "chunk", "api_key", "model_name", "model_aliases", "max_adapters",
              "replica_name",
              "allowed_hosts", "cors_origins", "max_body_bytes", "body_timeout", "prefix_cache", "prefix_cache_bytes",
              "stall_factor", "cohort_tokens")


@dataclass(frozen=True)
class ServeConfig:
    """How a server serves: its batch, queue, limits and who may call it.

    Attributes:
        max_batch: KV slots (requests decoded together); max_queue: requests waiting beyond them (503 after).
        capacity: tokens per slot (None: the export's max_length, shortened to fit memory by `fit_pool`).
        chunk: prefill tokens per step (None: the Scheduler's, phi_onnx.runtime.scheduler.CHUNK).
        api_key: when set, /v1 and /metrics need `Authorization: Bearer KEY`.
        model_name: the id under /v1/models (default: the export folder's name).
        model_aliases: more ids the model answers to (listed under /v1/models; `model` may be any).
        max_adapters: most switchable LoRA adapters kept loaded (least recently used dropped; None: all).
        replica_name: when set, every response carries `x-phi-onnx-replica: NAME` (Ray Serve).
        allowed_hosts: Host names served besides the loopback names and the address a connection came in on.
        cors_origins: web origins whose pages may call the API from a browser.
        max_body_bytes: largest request body (413 beyond); body_timeout: seconds a body may take (408 after).
        prefix_cache: reuse prompt prefixes across requests (the Scheduler's slots and prefix store).
        prefix_cache_bytes: the prefix store's budget (None: a fifth of the memory available at start).
        stall_factor: while streams decode, a step's prefill takes about this many decode steps at the pool's
            occupancy; higher: sooner first tokens, longer pauses in running streams.
        cohort_tokens: cold prompts arriving together while nothing streams start decoding together once all
            are prefilled, up to this many prompt tokens to compute (0: each starts as soon as its prompt is in).
        host, port, grace, header_timeout, max_connections: the CLI's listener (phi_onnx.serve.server).
    """

    max_batch: int = MAX_BATCH
    max_queue: int = MAX_QUEUE
    capacity: int | None = None
    chunk: int | None = None
    api_key: str | None = None
    model_name: str | None = None
    model_aliases: tuple[str, ...] = ()
    max_adapters: int | None = None
    replica_name: str | None = None
    allowed_hosts: tuple[str, ...] | None = None
    cors_origins: tuple[str, ...] | None = None
    max_body_bytes: int = 4 * 1024 * 1024
    body_timeout: float = 60.0
    prefix_cache: bool = True
    prefix_cache_bytes: int | None = None
    stall_factor: float = STALL_FACTOR
    cohort_tokens: int = COHORT_TOKENS
    host: str = "127.0.0.1"
    port: int = 8000
    grace: float = 10.0
    header_timeout: float = 10.0
    max_connections: int = 256

    def __post_init__(self) -> None:
        if isinstance(self.model_aliases, str):
            raise OptionsError("model_aliases is a list of names, not one string.")
        object.__setattr__(self, "model_aliases", tuple(self.model_aliases))
        for name in ("allowed_hosts", "cors_origins"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                object.__setattr__(self, name, tuple(value))
        if not finite_number(self.body_timeout) or self.body_timeout <= 0:
            raise OptionsError(f"body_timeout must be a positive number of seconds, not {self.body_timeout!r}.")
        if not finite_number(self.stall_factor) or self.stall_factor <= 0:
            raise OptionsError(f"stall_factor must be a positive number of decode steps, not {self.stall_factor!r}.")
        if isinstance(self.cohort_tokens, bool) or not isinstance(self.cohort_tokens, int) or self.cohort_tokens < 0:
            raise OptionsError(f"cohort_tokens must be a whole number of tokens >= 0, not {self.cohort_tokens!r}.")

    @classmethod
    def of(cls, config: ServeConfig | None = None, **options: Any) -> ServeConfig:
        """`config` (default: the defaults) with keyword `options` applied; an unknown one is a TypeError."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise TypeError(f"unexpected keyword arguments: {', '.join(unknown)}")
        return dataclasses.replace(config or cls(), **options)

    def app_options(self) -> dict[str, Any]:
        """The fields `create_app` reads, as keyword arguments."""
        return {name: getattr(self, name) for name in APP_FIELDS}


DEFAULTS = ServeConfig()


def fit_pool(folder: ModelFolder, config: ServeConfig, device: str = "auto", warn: Callable[[str], Any] | None = None,
             hint: str = "Lower --max-batch or --max-context.") -> ServeConfig:
    """Size the KV pool of a CPU server before its model loads: `config` with `capacity` shortened to fit
    the memory available beside the weights when it was left to the export's max_length (saying so
    through `warn`), and an OptionsError when even that does not fit. Used by `phi-onnx serve` and
    by each Ray replica (on its own node). GPU pools are left to the Scheduler's own check.

    Raises:
        OptionsError: the pool would not fit the memory available now (message and `hint`).
    """
    from phi_onnx.runtime import kv_pool
    from phi_onnx.runtime.providers import resolve_device

    if resolve_device(device, folder.export_device).kind != "cpu":
        return config
    available = kv_pool.available_memory()
    if available is not None:  # the weights load before the pool is allocated (Scheduler checks again then)
        available = max(available - folder.weight_bytes, 0)
    tokens, shortened = kv_pool.fit_slots(folder, config.max_batch, config.capacity, available)
    if shortened:
        full, nbytes = kv_pool.pool_bytes(folder, config.max_batch)
        if warn is not None:
            warn(f"{config.max_batch} slots of {full} tokens would need {nbytes / 2**30:.1f} GiB of the "
                 f"{(available or 0) / 2**30:.1f} GiB available beside the weights; serving {tokens} tokens per slot "
                 "(set --max-context or --max-batch to choose).")
        config = dataclasses.replace(config, capacity=tokens)
    kv_pool.check_pool_memory(kv_pool.pool_bytes(folder, config.max_batch, tokens)[1], config.max_batch, tokens,
                              hint=hint, reserved=folder.weight_bytes)
    return config

