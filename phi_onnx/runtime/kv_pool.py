"""Where KV memory lives and how a run binds it: the `KVPool`, and how big one may be.

Per layer and key/value one buffer [slots, kv_heads, capacity, head_dim]. Row s of every buffer
is one sequence's cache (a *slot*); a row is contiguous, so a run over slots [lo, hi) binds that
part of each buffer by pointer offset, with no copy, as both `past_key_values.N.*` and
`present.N.*`: GroupQueryAttention reads and writes the same memory and writes each step's
entries in place (`seqlens_k`, from the attention mask, says how much of a row is valid).

The pool also remembers which tokens each slot holds (`held`) and whether those entries were
computed with LongRoPE's long factors (`long`), so a caller can reuse a slot's prefix
(`LongRope.reusable`) or copy it to another slot (`copy_rows`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from phi_onnx.errors import OptionsError

if TYPE_CHECKING:
    from phi_onnx.runtime.folder import ModelFolder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KVLayout:
    """What a model's cache looks like: (past, present) input/output names per layer and key/value,
    heads, head size and element type."""

    names: tuple[tuple[str, str], ...]
    kv_heads: int
    head_size: int
    dtype: np.dtype[Any]

    @classmethod
    def of(cls, folder: ModelFolder) -> KVLayout:
        """The layout an export's graph uses."""
        names = tuple((f"past_key_values.{i}.{kind}", f"present.{i}.{kind}")
                      for i in range(folder.num_layers) for kind in ("key", "value"))
        return cls(names, folder.num_kv_heads, folder.head_size, np.dtype(folder.kv_dtype))

    def token_bytes(self) -> int:
        """Bytes one token takes in one slot, over every layer."""
        return len(self.names) * self.kv_heads * self.head_size * self.dtype.itemsize


class KVPool:
    """`slots` caches of `capacity` tokens each, allocated once.

    Args:
        layout: the model's KVLayout.
        slots, capacity: rows and tokens per row.
        device: "cpu" or "cuda"; device_id: the CUDA device.
        prefault: write every page now (a server: the memory is really held, and a newcomer's first
            run does not pay the page faults inside its time to first token); otherwise pages are
            touched when first written (a library call that may use a fraction of its capacity).
    """

    def __init__(self, layout: KVLayout, slots: int, capacity: int, device: str = "cpu", device_id: int = 0, *,
                 prefault: bool = False) -> None:
        self.layout, self.slots, self.capacity = layout, slots, capacity
        self.device, self.device_id = device, device_id
        self.row_shape = [layout.kv_heads, capacity, layout.head_size]
        self.row_bytes = int(np.prod(self.row_shape)) * layout.dtype.itemsize  # a slot's offset in a buffer
        self.nbytes = self.row_bytes * slots * len(layout.names)
        self.buffers = self._allocate(prefault)
        self.bases = [int(b.ctypes.data if isinstance(b, np.ndarray) else b.data_ptr()) for b in self.buffers]
        self.held: list[list[int]] = [[] for _ in range(slots)]
        self.long = [False] * slots
        #: each slot's switchable LoRA adapter (None: the base); its entries were computed with it
        self.adapter: list[str | None] = [None] * slots
        self._bindings: dict[tuple[int, int], Any] = {}
        self._session: Any = None

    def _allocate(self, prefault: bool) -> list[Any]:
        import onnxruntime as ort

        shape = [self.slots, *self.row_shape]
        started = time.perf_counter()
        pool = []
        for _ in self.layout.names:
            if self.device == "cpu":
                # Zeros, never stale bytes: a kernel that reads past the valid length and masks afterwards
                # would turn stale NaN bit patterns into NaN outputs. np.zeros is calloc (pages mapped lazily);
                # fill(0) touches every page now.
                buffer = np.empty(shape, dtype=self.layout.dtype) if prefault else np.zeros(shape, self.layout.dtype)
                if prefault:
                    buffer.fill(0)
                pool.append(buffer)
            else:
                pool.append(ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype=self.layout.dtype), self.device,
                                                             self.device_id))
        log.debug("KV pool: %d x %s %s on %s, written in %.1f s", len(pool), shape, self.layout.dtype, self.device,
                  time.perf_counter() - started)
        return pool

    def filled(self, slot: int) -> int:
        """Tokens whose keys and values slot `slot` holds."""
        return len(self.held[slot])

    def binding(self, session: Any, lo: int, hi: int) -> Any:
        """An IO binding of `session` with slots [lo, hi) of every buffer as past and present (kept per range)."""
        if session is not self._session:
            self._bindings, self._session = {}, session
        binding = self._bindings.get((lo, hi))
        if binding is None:
            binding = session.io_binding()
            shape = [hi - lo, *self.row_shape]
            kind = self.layout.dtype.type
            for (past, present), base in zip(self.layout.names, self.bases, strict=True):
                pointer = base + lo * self.row_bytes
                # Past and present are the same memory: GroupQueryAttention writes the new entries in place.
                binding.bind_input(past, self.device, self.device_id, kind, shape, pointer)
                binding.bind_output(present, self.device, self.device_id, kind, shape, pointer)
            self._bindings[lo, hi] = binding
        return binding

    def copy_rows(self, src: int, dst: int, n: int) -> None:
        """Make slot `dst` hold the first `n` tokens of slot `src` (same positions: no rotary shift)."""
        if not 0 <= n <= self.filled(src):
            raise ValueError(f"slot {src} holds {self.filled(src)} tokens, not {n}")  # a bug, not user input
        if self.device != "cpu":
            raise NotImplementedError("copying KV rows is implemented for CPU pools")
        if src != dst:
            for buffer in self.buffers:
                buffer[dst, :, :n] = buffer[src, :, :n]
        self.held[dst], self.long[dst] = list(self.held[src][:n]), self.long[src]
        self.adapter[dst] = self.adapter[src]  # the entries were computed with its adapter

    @property
    def parks(self) -> bool:
        """Whether a run may park its idle rows (`first_entries`): CPU pools, whose rows numpy can copy."""
        return self.device == "cpu"

    def first_entries(self, slots: Sequence[int]) -> list[np.ndarray]:
        """Copies of position 0 of `slots` in every buffer, for `put_first_entries` to write back: a run that
        parks an idle slot gives it a one-token mask, so its throw-away entry lands on position 0."""
        return [buffer[list(slots), :, 0, :] for buffer in self.buffers] if slots else []

    def put_first_entries(self, slots: Sequence[int], saved: list[np.ndarray]) -> None:
        """Write back what `first_entries(slots)` copied."""
        if slots:
            for buffer, entries in zip(self.buffers, saved, strict=True):
                buffer[list(slots), :, 0, :] = entries

    def keep(self, slot: int, n: int) -> None:
        """Keep only the first `n` held tokens of `slot` (later entries are overwritten by the next run)."""
        del self.held[slot][n:]
        if not n:
            self.long[slot] = False

    def clear(self, slot: int) -> None:
        """Forget what `slot` holds (its memory stays allocated)."""
        self.keep(slot, 0)

    def close(self) -> None:
        """Drop the buffers and bindings."""
        self._bindings, self._session = {}, None
        self.buffers, self.bases = [], []
        self.held = [[] for _ in range(self.slots)]


def pool_bytes(folder: ModelFolder, max_batch: int, capacity: int | None = None) -> tuple[int, int]:
    """(tokens per slot, bytes) of a KV pool of `max_batch` slots over `folder` (capacity: the export's
    max_length by default, never past the context)."""
    tokens = min(capacity or folder.default_max_length, folder.context_length)
    return tokens, KVLayout.of(folder).token_bytes() * tokens * max_batch


#: The machine's memory; then a container's limit (cgroup v2, v1): limit, usage, stat file, its inactive-file key.
MEMINFO = "/proc/meminfo"
CGROUPS = (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current", "/sys/fs/cgroup/memory.stat",
            "inactive_file"),
           ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes",
            "/sys/fs/cgroup/memory/memory.stat", "total_inactive_file"))


def available_memory() -> int | None:
    """Bytes of memory available now: MemAvailable from /proc/meminfo, or less where a container's
    memory limit leaves less (in a container /proc/meminfo shows the host's). None where neither is readable."""
    found = []
    try:
        with open(MEMINFO) as meminfo:
            found += [int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:")]
    except OSError:
        pass
    for limit_path, usage_path, stat_path, inactive in CGROUPS:
        try:
            with open(limit_path) as limit, open(usage_path) as usage:
                cap, used = limit.read().strip(), int(usage.read())
        except (OSError, ValueError):
            continue
        if cap.isdigit():
            # Reclaimable page cache counts as used in usage; the kernel drops it before an OOM kill.
            with contextlib.suppress(OSError, ValueError), open(stat_path) as stat:
                used -= next((int(line.split()[1]) for line in stat if line.split()[0] == inactive), 0)
            found.append(max(int(cap) - used, 0))
        break
    return min(found) if found else None


def check_pool_memory(nbytes: int, max_batch: int, capacity: int,
                      hint: str = "Lower max_batch or capacity (create_app / Scheduler).", reserved: int = 0) -> None:
    """Raise OptionsError when a CPU KV pool of `nbytes` would not fit in the memory available now,
    less `reserved` bytes still to be loaded (the weights, when checked before the model loads)."""
    available = available_memory()
    if available is not None and nbytes > 0.9 * (available - reserved):
        beside = f" beside the model's {reserved / 2**30:.1f} GiB of weights" if reserved else ""
        raise OptionsError(
            f"The KV cache for {max_batch} requests of {capacity} tokens needs {nbytes / 2**30:.1f} GiB, "
            f"but only {max(available - reserved, 0) / 2**30:.1f} GiB of memory is available{beside}.",
            hint=hint)


def fit_slots(folder: ModelFolder, max_batch: int, capacity: int | None, available: int | None) -> tuple[int, bool]:
    """Tokens per slot for a server of `max_batch` slots: `capacity` when given; else the export's
    max_length, shortened (in steps of 256) to fit half of `available` bytes. (tokens, shortened)."""
    tokens, nbytes = pool_bytes(folder, max_batch, capacity)
    if capacity is not None or available is None or nbytes <= available // 2:
        return tokens, False
    # The default is the export's max_length, the model's whole context: often more than fits
    # (Phi-3-mini: 8 x 4096 tokens are 24 GiB); shorter slots serve, a refusal would not.
    per_token = KVLayout.of(folder).token_bytes() * max_batch
    fitted = (available // 2 // per_token) // 256 * 256
    return (fitted, True) if fitted >= 256 else (tokens, False)
