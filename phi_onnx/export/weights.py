"""Turn checkpoint tensors into lazily computed initializers in the export's precision."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir

from phi_onnx.export.graph import GraphBuilder, Value
from phi_onnx.export.options import ExportOptions
from phi_onnx.quantize.clip import quantize_clip
from phi_onnx.quantize.embedding import QuantizedTable, quantize_table, table_shapes
from phi_onnx.quantize.int4 import Int4Weight, quantize_int4

Loader = Callable[[], np.ndarray]


@dataclass
class Linear:
    """A linear layer as the graph was built: its input value and how to load its weight [out, in]."""

    key: str
    x: Value
    load: Loader
    n: int
    k: int


class Weights:
    """Makes float initializers and linear layers (MatMul or MatMulNBits) from loaders.

    A loader returns one float32 array as the checkpoint stores it ([out, in] for linear weights);
    it runs only when the model is written, so at most a few tensors are resident at a time.
    """

    def __init__(self, options: ExportOptions, *, capture: bool = False) -> None:
        self.options = options
        #: int4 weights computed beforehand (GPTQ, calibrated clip), by layer key; loaded when written
        self.precomputed: dict[str, Callable[[], Int4Weight]] = {}
        #: with `capture`, every linear is a float MatMul and is listed here (for calibration)
        self.linears: list[Linear] | None = [] if capture else None
        #: keeps the folder holding `precomputed`'s results alive until the model is written
        self.spill: object | None = None
        #: layer keys written as 8-bit MatMulNBits in an int4 export (mixed precision)
        self.eight_bit: frozenset[str] = frozenset()
        #: layer keys kept as float MatMul in an int4 graph (calibration measures one int4 layer at a time)
        self.float_keys: frozenset[str] = frozenset()
        self.io_dtype = ir.DataType.FLOAT16 if options.io_dtype == "fp16" else ir.DataType.FLOAT
        self.np_dtype = np.float16 if options.io_dtype == "fp16" else np.float32
        self._pending: dict[str, tuple[int, Int4Weight | QuantizedTable | None]] = {}
        self._lock = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}
        self._deferred: list[Value] = []

    def tensor(self, g: GraphBuilder, name: str, shape: tuple[int, ...], load: Loader) -> Value:
        """A float initializer in the activation dtype (norm gammas, embeddings, biases)."""
        return g.weight(name, self.io_dtype, shape, lambda: load().astype(self.np_dtype, copy=False))

    def linear(self, g: GraphBuilder, x: Value, name: str, out_features: int, in_features: int,
               load: Loader, bias: Loader | None = None) -> Value:
        """`x @ W.T (+ b)` for a checkpoint weight W [out, in], as MatMul or int4 MatMulNBits."""
        with g.scope(name):
            if self.linears is not None:
                self.linears.append(Linear(g.prefix, x, load, out_features, in_features))
            int4 = self.options.precision == "int4" and self.linears is None and g.prefix not in self.float_keys
            if int4 and g.prefix in self.eight_bit:
                y = self._matmul_8bits(g, x, out_features, in_features, load)
            elif int4:
                y = self._matmul_nbits(g, x, name, out_features, in_features, load)
            else:
                w = g.weight(f"{g.prefix}.weight", self.io_dtype, (in_features, out_features),
                             lambda: load().T.astype(self.np_dtype, order="C"))  # one copy, not two
                y = g.op("MatMul", x, w)
            if bias is not None:
                y = g.op("Add", y, self.tensor(g, f"{g.prefix}.bias", (out_features,), bias))
        return y

    def _matmul_nbits(self, g: GraphBuilder, x: Value, name: str, n: int, k: int, load: Loader) -> Value:
        opts = self.options
        key = g.prefix
        parts = 2 if opts.symmetric else 3
        self._pending[key] = (parts, None)
        self._locks[key] = threading.Lock()
        k_blocks = -(-k // opts.block_size)

        def part(select: Callable[[Int4Weight], np.ndarray]) -> Loader:
            return lambda: select(self._quantized(key, load))

        packed = g.weight(f"{key}.weight_q4", ir.DataType.UINT8, (n, k_blocks, opts.block_size // 2),
                          part(lambda q: q.packed))
        # Weights are written in initializer order by two threads. Placing this layer's scales after
        # the *next* layer's packed weight lets the second thread quantize that next layer instead
        # of waiting for this one (measured: 0.95B int4 export 32.7 s → 26.9 s, same peak memory).
        self.flush(g)
        scales = g.weight(f"{key}.weight_scales", self.io_dtype, (n * k_blocks,),
                          part(lambda q: q.scales.astype(self.np_dtype)), register=False)
        self._deferred.append(scales)
        zero_points = None
        if not opts.symmetric:
            zero_points = g.weight(f"{key}.weight_zp", ir.DataType.UINT8, (n * ((k_blocks + 1) // 2),),
                                   part(lambda q: q.zero_points), register=False)  # type: ignore[arg-type,return-value]
            self._deferred.append(zero_points)
        return g.ms("MatMulNBits", x, packed, scales, zero_points, K=k, N=n, bits=4,
                    block_size=opts.block_size, accuracy_level=opts.effective_accuracy_level)

    def _matmul_8bits(self, g: GraphBuilder, x: Value, n: int, k: int, load: Loader) -> Value:
        """`x @ W.T` as MatMulNBits with bits=8: round-to-nearest 8-bit blocks of the int4 block size (the
        LM head's layout, `phi_onnx.quantize.embedding`), for the projections mixed precision keeps."""
        opts = self.options
        key = g.prefix
        shapes = table_shapes(n, k, 8, opts.block_size, opts.symmetric)
        self._pending[key] = (len(shapes), None)
        self._locks[key] = threading.Lock()

        def part(select: Callable[[QuantizedTable], np.ndarray]) -> Loader:
            return lambda: select(self._quantized(key, load, bits=8))

        packed = g.weight(f"{key}.weight_q8", ir.DataType.UINT8, shapes["packed"], part(lambda q: q.packed))
        scales = g.weight(f"{key}.weight_scales", self.io_dtype, (n * shapes["scales"][1],),
                          part(lambda q: q.scales.reshape(-1).astype(self.np_dtype)))
        zero_points = None
        if "zero_points" in shapes:
            zero_points = g.weight(f"{key}.weight_zp", ir.DataType.UINT8, (n * shapes["zero_points"][1],),
                                   part(lambda q: q.zero_points.reshape(-1)))  # type: ignore[union-attr]
        return g.ms("MatMulNBits", x, packed, scales, zero_points, K=k, N=n, bits=8, block_size=opts.block_size,
                    accuracy_level=opts.effective_accuracy_level)

    def flush(self, g: GraphBuilder) -> None:
        """Register initializers held back for write order; call once more when the graph is done."""
        for value in self._deferred:
            g.add_initializer(value)
        self._deferred.clear()

    @property
    def scale_dtype(self) -> type:
        """The dtype MatMulNBits reads scales in (the activation dtype)."""
        return self.np_dtype

    def quantize(self, key: str, load: Loader) -> Int4Weight:
        """Layer `key`'s int4 weight: precomputed (GPTQ), else by the options' algorithm; weights that
        calibration does not reach (MoE experts) get the clip search under `gptq`."""
        opts = self.options
        if key in self.precomputed:
            return self.precomputed[key]()
        if opts.algo in ("clip", "gptq"):
            return quantize_clip(load(), opts.block_size, opts.symmetric, scale_dtype=self.scale_dtype)
        return quantize_int4(load(), opts.block_size, opts.symmetric)

    def _quantized(self, key: str, load: Loader, bits: int = 4) -> Any:
        """Quantize once (an `Int4Weight`, or at 8 bits a `QuantizedTable`), hand the result to each of its
        parts, then drop it."""
        with self._locks[key]:
            remaining, q = self._pending[key]
            if q is None:
                q = self.quantize(key, load) if bits == 4 else quantize_table(
                    load(), 8, self.options.block_size, self.options.symmetric)
            remaining -= 1
            self._pending[key] = (remaining, None if remaining == 0 else q)
            if remaining == 0:
                # The model may be evaluated again (e.g. saved twice): start over next time.
                parts = 2 if self.options.symmetric else 3
                self._pending[key] = (parts, None)
            return q

