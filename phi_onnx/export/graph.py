"""A small graph builder over onnx-ir: ops are functions that return values, names follow scopes.

Weights are `onnx_ir.LazyTensor`s: nothing is read from the checkpoint until the model is saved,
and `onnx_ir.save` then writes the external data tensor by tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

MS_DOMAIN = "com.microsoft"
OPSETS = {"": 21, MS_DOMAIN: 1}

Value = ir.Value


class StackedTensor(ir.LazyTensor):
    """A lazy tensor of equal-shaped parts stacked along axis 0, whose `tofile` writes one part at a time.

    onnx-ir writes external data through `tofile` when a tensor has it; anything that asks for the
    whole array (`numpy()`, `tobytes()`) still gets it, stacked.
    """

    def __init__(self, parts: Sequence[Callable[[], np.ndarray]], dtype: ir.DataType, shape: Sequence[int],
                 np_dtype: Any, *, name: str) -> None:
        self.parts = list(parts)
        self.np_dtype = np.dtype(np_dtype)
        self.part_shape = tuple(shape[1:])
        if len(self.parts) != shape[0]:
            raise ValueError(f"{name}: {len(self.parts)} parts for a first dimension of {shape[0]}")
        super().__init__(lambda: ir.Tensor(np.stack([self.part(i) for i in range(len(self.parts))]), name=name),
                         dtype=dtype, shape=ir.Shape(shape), name=name)

    def part(self, index: int) -> np.ndarray:
        """Part `index`, loaded, cast and shape-checked."""
        array = np.ascontiguousarray(self.parts[index](), dtype=self.np_dtype)
        if array.shape != self.part_shape:
            raise ValueError(f"{self.name}[{index}]: expected shape {self.part_shape}, loaded {array.shape}")
        return array

    def tofile(self, file: Any) -> None:
        """Write the parts one after another (the layout of the stacked array)."""
        for index in range(len(self.parts)):
            self.part(index).tofile(file)


class GraphBuilder:
    """Collects nodes, initializers, inputs and outputs under hierarchical names.

    `with g.scope("model", "layers.0", "attn"):` makes node names like
    `/model/layers.0/attn/qkv_proj/MatMul`, the way onnxruntime-genai's models read.
    """

    def __init__(self) -> None:
        self.nodes: list[ir.Node] = []
        self.initializers: list[ir.Value] = []
        self.inputs: list[ir.Value] = []
        self.outputs: list[ir.Value] = []
        self._scope: list[str] = []
        self._names: set[str] = set()
        self._consts: dict[tuple[Any, ...], ir.Value] = {}

    @contextmanager
    def scope(self, *parts: str) -> Iterator[None]:
        """Nest node names under `parts` for the duration of the block."""
        self._scope.extend(parts)
        try:
            yield
        finally:
            del self._scope[len(self._scope) - len(parts):]

    @property
    def prefix(self) -> str:
        """The current scope as a dotted initializer name, e.g. `model.layers.0.attn.qkv_proj`."""
        return ".".join(self._scope)

    def _unique(self, name: str) -> str:
        candidate, n = name, 0
        while candidate in self._names:
            n += 1
            candidate = f"{name}_{n}"
        self._names.add(candidate)
        return candidate

    def op(self, op_type: str, *inputs: Value | None, outputs: int = 1, domain: str = "",
           name: str | None = None, **attributes: Any) -> Any:
        """Add a node; returns its output value, or a tuple of them when `outputs` > 1."""
        node_name = self._unique("/" + "/".join([*self._scope, name or op_type]))
        attrs = {k: v for k, v in attributes.items() if v is not None}
        node = ir.Node(domain, op_type, list(inputs), attributes=ir.convenience.convert_attributes(attrs),
                       num_outputs=outputs, name=node_name)
        for i, out in enumerate(node.outputs):
            out.name = f"{node_name}/output_{i}"
        self.nodes.append(node)
        return node.outputs[0] if outputs == 1 else tuple(node.outputs)

    def ms(self, op_type: str, *inputs: Value | None, **kwargs: Any) -> Any:
        """A `com.microsoft` contrib op (GroupQueryAttention, MatMulNBits, ...)."""
        return self.op(op_type, *inputs, domain=MS_DOMAIN, **kwargs)

    def input(self, name: str, dtype: ir.DataType, shape: Sequence[int | str]) -> Value:
        """Declare a graph input."""
        value = ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(shape))
        self.inputs.append(value)
        return value

    def output(self, value: Value, name: str, dtype: ir.DataType, shape: Sequence[int | str]) -> None:
        """Expose `value` as a graph output called `name`."""
        value.name = name
        value.type = ir.TensorType(dtype)
        value.shape = ir.Shape(shape)
        self.outputs.append(value)

    def weight(self, name: str, dtype: ir.DataType, shape: Sequence[int],
               load: Callable[[], np.ndarray], *, register: bool = True) -> Value:
        """A lazily loaded initializer: `load()` runs only when the model is saved (or evaluated).

        With `register=False` the caller adds it later with `add_initializer`, which sets its place
        in the write order.
        """
        def tensor() -> ir.TensorProtocol:
            array = load()
            if tuple(array.shape) != tuple(shape):
                raise ValueError(f"{name}: expected shape {tuple(shape)}, loaded {array.shape}")
            return ir.Tensor(array, name=name)

        lazy = ir.LazyTensor(tensor, dtype=dtype, shape=ir.Shape(shape), name=name)
        value = ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(shape), const_value=lazy)
        if register:
            self.initializers.append(value)
        return value

    def stacked_weight(self, name: str, dtype: ir.DataType, shape: Sequence[int],
                       parts: Sequence[Callable[[], np.ndarray]], np_dtype: Any) -> Value:
        """An initializer made of `parts` stacked along a new first axis (e.g. one per expert),
        written part by part, so saving never holds more than one part in memory."""
        value = ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(shape),
                         const_value=StackedTensor(parts, dtype, shape, np_dtype, name=name))
        self.initializers.append(value)
        return value

    def add_initializer(self, value: Value) -> None:
        """Append an initializer made with `weight(..., register=False)`."""
        self.initializers.append(value)

    def const(self, array: np.ndarray | float | int | Sequence[int], dtype: Any = None) -> Value:
        """A small constant initializer; identical constants are shared."""
        arr = np.asarray(array, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            name = self._unique(f"/const/{arr.dtype.name}_{'x'.join(map(str, arr.shape)) or 'scalar'}")
            value = ir.Value(name=name, type=ir.TensorType(ir.DataType.from_numpy(arr.dtype)),
                             shape=ir.Shape(arr.shape), const_value=ir.Tensor(arr, name=name))
            self.initializers.append(value)
            self._consts[key] = value
        return self._consts[key]

    def model(self, *, producer_version: str, metadata: dict[str, str] | None = None) -> ir.Model:
        """The finished model; initializers stay lazy until saved."""
        graph = ir.Graph(self.inputs, self.outputs, nodes=self.nodes, initializers=self.initializers,
                         opset_imports=OPSETS, name="main_graph")
        model = ir.Model(graph, ir_version=10, producer_name="phi-onnx", producer_version=producer_version)
        # Shared helpers may compute values a family does not read (e.g. positions with fused rotary).
        RemoveUnusedNodesPass()(model)
        if metadata:
            model.metadata_props.update(metadata)
        return model
