"""Switchable LoRA adapters at run time: which rows of a run use which adapter.

An export made with `--adapter` has LoRA inputs on its projections (`phi_onnx.export.lora`) and its
adapters as `NAME.onnx_adapter` files listed in `adapters.json`. A run binds, per projection, the LoRA
pairs of the adapters its rows use concatenated along the rank, which adapter owns each rank column,
and `adapter_index` [rows]; each row keeps its own adapter's columns (none for the base). So one run
serves rows with different adapters (and the base), and a base-only run binds rank-0 tensors, which
cost a few empty MatMuls.

Adapter files are read when first used; the concatenations are built once per set of adapters and
kept (a few). ONNX Runtime's `run_with_iobinding` ignores RunOptions' active adapters, so the tensors
are bound as inputs here.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from phi_onnx.errors import OptionsError
from phi_onnx.export.lora import INDEX_INPUT, SUFFIX, LoraTarget, read_adapter_file, read_index
from phi_onnx.source.adapter import AdapterError

#: Stacks kept (each a set of adapters some run used), most recently used last.
MAX_STACKS = 8

Members = tuple[str | None, ...]


class LoraBank:
    """The adapters of an export and the stacked tensors runs bind.

    Args:
        folder: the export folder (with adapters.json).
        device, device_id: where the session runs ("cpu" or "cuda").
    """

    def __init__(self, folder: Path, device: str = "cpu", device_id: int = 0) -> None:
        index = read_index(folder)
        if index is None:
            raise AdapterError(f"{folder} has no adapters.json.", hint="Export the model with --adapter NAME=PATH.")
        self.folder = folder
        self.targets: dict[str, LoraTarget] = index["targets"]
        self.names: tuple[str, ...] = tuple(sorted(index["adapters"]))
        self.np_dtype = np.dtype(np.float16 if index["dtype"] == "fp16" else np.float32)
        self.device, self.device_id = device, device_id
        self._params: OrderedDict[str, dict[str, np.ndarray]] = OrderedDict()  # loaded adapters, LRU last
        self._max_loaded: int | None = None
        self._stacks: OrderedDict[Members, dict[str, Any]] = OrderedDict()
        self._bound: dict[int, tuple[Any, Members, Any]] = {}  # id(binding) → (binding, members, their stack)
        self._lock = threading.RLock()  # params() may run on a submitting thread

    def check(self, name: str | None) -> None:
        """Refuse an adapter name this export does not have (None, the base, is always there)."""
        if name is not None and name not in self.names:
            listed = ", ".join(self.names) or "none"
            raise OptionsError(f"This model has no adapter {name!r} (its adapters: {listed}).",
                               hint="Pick one of them, or add it with `phi-onnx adapter add FOLDER NAME=PATH`.")

    def params(self, name: str) -> dict[str, np.ndarray]:
        """Adapter `name`'s tensors ({scope.lora_A: [in, r], scope.lora_B: [r, out], scope.lora_adapter: [r]}),
        read once, checked."""
        self.check(name)
        with self._lock:
            return self._read(name)

    def _read(self, name: str) -> dict[str, np.ndarray]:
        if name in self._params:
            self._params.move_to_end(name)
        else:
            params = read_adapter_file(self.folder / f"{name}{SUFFIX}")
            for key, value in params.items():
                scope, _, side = key.rpartition(".")
                target = self.targets.get(scope)
                ok = target is not None and (
                    (side == "lora_A" and value.ndim == 2 and value.shape[0] == target.in_features) or
                    (side == "lora_B" and value.ndim == 2 and value.shape[1] == target.out_features) or
                    (side == "lora_adapter" and value.ndim == 1))
                if not ok:
                    raise AdapterError(f"{self.folder / (name + SUFFIX)}: parameter {key!r} {list(value.shape)} does "
                                       "not match any LoRA input of this model.",
                                       hint="Add the adapter again (phi-onnx adapter add).")
            self._params[name] = {k: v if k.endswith(".lora_adapter") else v.astype(self.np_dtype, copy=False)
                                  for k, v in params.items()}
            self._trim()
        return self._params[name]

    @property
    def max_loaded(self) -> int | None:
        """Most adapters kept loaded (None: all); beyond it the least recently used is dropped (with the
        stacks built from it) and read again from its file when a request asks for it."""
        return self._max_loaded

    @max_loaded.setter
    def max_loaded(self, value: int | None) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise OptionsError(f"max_loaded must be a whole number >= 1 or None (got {value!r}).",
                               hint="Use e.g. --max-adapters 8.")
        with self._lock:
            self._max_loaded = value
            self._trim()

    def _trim(self) -> None:
        while self._max_loaded is not None and len(self._params) > self._max_loaded:
            dropped, _ = self._params.popitem(last=False)
            for members in [m for m in self._stacks if dropped in m]:
                del self._stacks[members]  # a binding still pointing at it keeps it alive (_bound)

    @property
    def loaded(self) -> tuple[str, ...]:
        """The adapters whose tensors are in memory now, least recently used first."""
        with self._lock:
            return tuple(self._params)

    def bind(self, binding: Any, rows: Sequence[str | None]) -> None:
        """Bind the stacks and `adapter_index` for a run whose row b uses adapter `rows[b]` (None: the base)."""
        members: Members = tuple(sorted(set(rows), key=lambda n: (n is not None, n or "")))
        with self._lock:
            last = self._bound.get(id(binding))
            if last is None or last[1] != members:
                stack = self._stack(members)
                for name, value in stack.items():
                    binding.bind_ortvalue_input(name, value)
                # The binding points into the stack's buffers: keep them while it may run.
                self._bound[id(binding)] = (binding, members, stack)
        binding.bind_cpu_input(INDEX_INPUT, np.array([members.index(n) for n in rows], dtype=np.int64))

    def _stack(self, members: Members) -> dict[str, Any]:
        stack = self._stacks.get(members)
        if stack is not None:
            self._stacks.move_to_end(members)
            return stack
        import onnxruntime as ort

        params = [self.params(n) if n is not None else {} for n in members]
        stack = {}
        for scope, target in self.targets.items():
            a_parts, b_parts, owners = [], [], []
            for i, p in enumerate(params):
                a, b = p.get(f"{scope}.lora_A"), p.get(f"{scope}.lora_B")
                if a is not None and b is not None:
                    a_parts.append(a)
                    b_parts.append(b)
                    owners.append(np.full(a.shape[1], i, np.int64))
            a = np.concatenate(a_parts, axis=1) if a_parts else np.zeros((target.in_features, 0), self.np_dtype)
            b = np.concatenate(b_parts, axis=0) if b_parts else np.zeros((0, target.out_features), self.np_dtype)
            owner = np.concatenate(owners) if owners else np.zeros(0, np.int64)
            for key, value in (("lora_A", a), ("lora_B", b), ("lora_adapter", owner)):
                stack[f"{scope}.{key}"] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value), self.device,
                                                                           self.device_id)
        self._stacks[members] = stack
        while len(self._stacks) > MAX_STACKS:
            self._stacks.popitem(last=False)
        return stack


def require_lora_inputs(model: bytes | Path) -> bytes:
    """The graph (structure only) with the LoRA inputs' zero-rank defaults removed, so they are plain inputs.

    ONNX Runtime's IO binding cannot bind an input that has a default (an initializer of the same name),
    and the runtime binds them on every run anyway.
    """
    import onnx

    proto = onnx.load_from_string(model) if isinstance(model, bytes) else onnx.load(str(model),
                                                                                     load_external_data=False)
    graph = proto.graph
    inputs = {i.name for i in graph.input}
    kept = [init for init in graph.initializer
            if not (init.name in inputs and (init.name == INDEX_INPUT or
                                             init.name.endswith((".lora_A", ".lora_B", ".lora_adapter"))))]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return proto.SerializeToString()
