"""The token embedding and the LM head as block-quantized tables (int4 exports).

The embedding becomes `GatherBlockQuantized` over a 4- or 8-bit table; an 8-bit LM head becomes
`MatMulNBits` with bits=8. When the model ties the two and they use the same bits, one table is
stored and both nodes read it (see `phi_onnx.quantize.embedding` for why the layouts coincide).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from phi_onnx.export.graph import GraphBuilder, Value
from phi_onnx.export.options import ExportOptions
from phi_onnx.quantize.embedding import QuantizedTable, quantize_table, table_shapes

log = logging.getLogger(__name__)

EMBEDDING = "model.embed_tokens.weight"
Loader = Callable[[], np.ndarray]


@dataclass(frozen=True)
class TableValues:
    """The initializers of one quantized table."""

    packed: Value  # [n, n_blocks, blob] (MatMulNBits' shape)
    scales: Value  # [n, n_blocks]
    zero_points: Value | None
    bits: int
    n: int
    k: int


class QuantizedTables:
    """Makes the quantized tables of one export; a checkpoint tensor at given bits is stored once."""

    def __init__(self, options: ExportOptions, io_dtype: ir.DataType, np_dtype: type) -> None:
        self.options = options
        self.io_dtype = io_dtype
        self.np_dtype = np_dtype
        self._values: dict[tuple[str, int], TableValues] = {}

    def embedding_bits(self) -> int | None:
        """Bits of the embedding table, None to keep it in the activation dtype."""
        return {"int4": 4, "int8": 8}.get(self.options.resolved_embeddings)

    def takes_head(self, name: str) -> bool:
        """Whether the LM head over checkpoint tensor `name` is built here instead of by `Weights`.

        An 8-bit head always is. A 4-bit head is only when it can share the embedding's table and
        the linear layers' algorithm needs no data (rtn, plain clip: the table is made the same way);
        calibrated algorithms quantize the head themselves.
        """
        opts = self.options
        if opts.precision != "int4":
            return False
        if opts.resolved_lm_head_bits == 8:
            return True
        return (name, 4) in self._values and self._data_free()

    def _data_free(self) -> bool:
        """Whether the layers' int4 algorithm is one a table can use too (rtn, or clip without a text)."""
        return self.options.algo == "rtn" or (self.options.algo == "clip" and not self.options.weights_calibration)

    def embed(self, g: GraphBuilder, input_ids: Value, load: Loader, vocab: int, hidden: int,
              tied: bool) -> Value:
        """Embedding lookup of `input_ids` from the table `load()` [vocab, hidden]."""
        bits = self.embedding_bits()
        assert bits is not None
        values = self.table(g, EMBEDDING, vocab, hidden, bits, load)
        # 8-bit tables round to nearest whatever the algorithm, so an 8-bit head always shares the table.
        if tied and bits == self.options.resolved_lm_head_bits and (bits == 8 or self._data_free()):
            log.info("tied embeddings: the embedding and the LM head share one %d-bit table", bits)
        n_blocks, blob = values.packed.shape[1], values.packed.shape[2]
        # GatherBlockQuantized wants data of the scales' rank; MatMulNBits wants B 3-D and refuses
        # rank-3 scales. A Reshape (no copy in ORT) reconciles them.
        data = g.op("Reshape", values.packed, g.const([vocab, n_blocks * blob], np.int64))
        out = g.ms("GatherBlockQuantized", data, input_ids, values.scales, values.zero_points, bits=bits,
                   block_size=self.options.block_size, gather_axis=0, quantize_axis=1)
        if n_blocks * self.options.block_size != hidden:  # K padded up to a whole block
            out = g.op("Slice", out, g.const([0], np.int64), g.const([hidden], np.int64), g.const([-1], np.int64))
        return out

    def head(self, g: GraphBuilder, x: Value, name: str, out_features: int, in_features: int,
             load: Loader) -> Value:
        """`x @ W.T` as MatMulNBits at the LM head's bits (sharing the embedding's table if it can)."""
        bits = self.options.resolved_lm_head_bits
        values = self.table(g, name, out_features, in_features, bits, load)
        return g.ms("MatMulNBits", x, values.packed, values.scales, values.zero_points, K=in_features,
                    N=out_features, bits=bits, block_size=self.options.block_size,
                    accuracy_level=self.options.effective_accuracy_level)

    def table(self, g: GraphBuilder, name: str, n: int, k: int, bits: int, load: Loader) -> TableValues:
        """The initializers of checkpoint tensor `name` at `bits`, made on first use."""
        key = (name, bits)
        if key in self._values:
            return self._values[key]
        opts = self.options
        shapes = table_shapes(n, k, bits, opts.block_size, opts.symmetric)
        clip = opts.algo == "clip"  # 4-bit tables get the layers' clip search too (calibrated or not)
        once = _Once(lambda: quantize_table(load(), bits, opts.block_size, opts.symmetric, clip=clip,
                                            scale_dtype=self.np_dtype), len(shapes))
        prefix = f"{name.removesuffix('.weight')}.q{bits}"
        packed = g.weight(f"{prefix}.weight", ir.DataType.UINT8, shapes["packed"], once.part(lambda q: q.packed))
        scales = g.weight(f"{prefix}.scales", self.io_dtype, shapes["scales"],
                          once.part(lambda q: q.scales.astype(self.np_dtype)))
        zero_points = None
        if "zero_points" in shapes:
            zero_points = g.weight(f"{prefix}.zero_points", ir.DataType.UINT8, shapes["zero_points"],
                                   once.part(lambda q: q.zero_points))  # type: ignore[arg-type,return-value]
        self._values[key] = TableValues(packed, scales, zero_points, bits, n, k)
        return self._values[key]


class _Once:
    """Quantizes once for a table's parts (written one after another, maybe by two threads), then
    drops the result; a later save (the model written twice) quantizes again."""

    def __init__(self, compute: Callable[[], QuantizedTable], parts: int) -> None:
        self.compute = compute
        self.parts = parts
        self._served = 0
        self._result: QuantizedTable | None = None
        self._lock = threading.Lock()

    def part(self, select: Callable[[QuantizedTable], np.ndarray]) -> Loader:
        """A loader for one part of the quantized table."""
        def load() -> np.ndarray:
            with self._lock:
                if self._result is None:
                    self._result = self.compute()
                result = self._result
                self._served += 1
                if self._served == self.parts:
                    self._served, self._result = 0, None
            return select(result)
        return load
