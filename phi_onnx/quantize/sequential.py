"""Data-aware int4 layer by layer: each layer calibrated on the inputs the quantized layers before it give.

Design: the family's own graph code builds one decoder layer at a time (`builder.layer(i, ...)`)
into a small graph whose inputs are the hidden state and residual stream entering that layer (the
first stage is the family's `embedding()`, as exported: scaled, block-quantized). For layer i:

1. a *capture* graph (layer i in fp32, every linear's input also a graph output) runs on the
   calibration windows, which yields each linear's Hessian X^T X;
2. each linear of the layer is quantized (GPTQ, or the clip search weighted by diag(X^T X));
3. the same layer built with those int4 weights (MatMulNBits, as exported) runs again, and its
   outputs are the next layer's inputs.

The final norm and the LM head are the last stage (skipped when the head is an 8-bit table, which
rounds to nearest and needs no calibration). Only one layer's weights are in a graph at a
time, activations are kept for the calibration tokens only (a few thousand), and the int4 results
are spilled to a temporary folder, so memory stays about one fp32 layer plus its Hessians whatever
the model's depth. Everything runs on ONNX Runtime's CPU provider with the kernels the export uses:
no torch. Graphs are the exporter's own, so every family (Phi-2, Phi-3, Phi-3-small, Phi-3.5-MoE)
is calibrated without a second implementation of its math. Phi-3.5-MoE's experts run through QMoE
and are not calibrated; under `gptq` they get the clip search.

Mixed precision (`mix="auto"`, `phi_onnx.quantize.mix`) measures here too: after step 2, the layer runs
once per linear with only that linear in int4 (the others in fp32), on the first `mix.SENSITIVITY_TOKENS`
calibration tokens, and the error of its output (the residual stream after the layer) relative to the fp32
layer's is that linear's sensitivity. (Phi-3.5-MoE's experts are QMoE int4 in every one of these runs, as in
the export, so the differences are the attention's.)
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from phi_onnx.export.embeddings import QuantizedTables
from phi_onnx.export.graph import GraphBuilder
from phi_onnx.export.options import ExportOptions
from phi_onnx.export.weights import Linear, Weights
from phi_onnx.quantize.calibration import Calibration
from phi_onnx.quantize.clip import quantize_clip
from phi_onnx.quantize.gptq import DAMP, LAZY_BATCH, Factor, Hessian, gptq_factor, quantize_gptq
from phi_onnx.quantize.int4 import Int4Weight, quantize_int4
from phi_onnx.quantize.mix import SENSITIVITY_TOKENS, Sensitivity, choose_eight_bit, mix_record, sensitivity

log = logging.getLogger(__name__)

#: Pick each GPTQ block's range by the clip search. On tiny-phi3 block 128 (benchmarks/int4_quality.py):
#: KLD 3.79e-3 against 3.84e-3 with the blocks' extremes, top-1 gain over rtn-32 +1.85 against +1.52 pt.
GPTQ_SEARCH = True
#: Act-order with static groups (`quantize_gptq(act_order=True)`): off, the evidence is mixed. On tiny-phi3
#: block 128 (benchmarks/int4_quality.py) KLD / rtn-32 0.628 (SE 0.013) against 0.661 (0.012) in natural
#: order, top-1 gain +1.81 against +1.69 pt, block 32 unchanged (0.468 against 0.469); but on the random
#: tiny Phi-3 of tests/quantize/test_families_gptq.py the logit error / rtn rises from 0.68 to 0.87.
GPTQ_ACT_ORDER = False
RUN_TOKENS = 2048  #: tokens per ONNX Runtime call (bounds activation memory)


class Spill:
    """int4 results on disk, loaded when the export writes them; the folder goes with this object."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="phi-onnx-int4-"))
        self.loaders: dict[str, Callable[[], Int4Weight]] = {}

    def put(self, key: str, q: Int4Weight) -> None:
        path = self.folder / f"{len(self.loaders)}.npz"
        zp = q.zero_points if q.zero_points is not None else np.zeros(0, np.uint8)
        np.savez(path, packed=q.packed, scales=q.scales, zero_points=zp,
                 meta=np.asarray([q.n, q.k, q.block_size, q.zero_points is not None]))

        def load() -> Int4Weight:
            with np.load(path) as data:
                n, k, block, has_zp = (int(v) for v in data["meta"])
                return Int4Weight(data["packed"], data["scales"], data["zero_points"] if has_zp else None,
                                  n, k, block)

        self.loaders[key] = load

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def __del__(self) -> None:
        self.close()


def calibrate(builder_cls: type, cfg: Any, checkpoint: Any, options: ExportOptions, calibration: Calibration,
              *, damp: float = DAMP, sensitivities: dict[str, Sensitivity] | None = None) -> Spill:
    """Quantize every linear layer of the model with `options.algo` on `calibration`, layer by layer.

    Returns the results by layer key (as `Weights` names them), for `Weights.precomputed`. With
    `sensitivities` (a dict to fill), each decoder layer's linears are measured for mixed precision too.
    """
    cal_options = replace(options, device="cpu", precision="int4", accuracy_level=None, mix="none",
                          mix_budget=None)
    scale_dtype = np.float16 if options.io_dtype == "fp16" else np.float32
    builder = builder_cls(cfg, checkpoint, cal_options)
    builder.check()
    spill = Spill()
    ids = calibration.ids
    residual: np.ndarray | None = None
    work = Path(tempfile.mkdtemp(prefix="phi-onnx-calibrate-"))
    try:
        hidden, _ = _Stage(builder, cal_options, spill, work, ids, layer="embedding").forward(None, None)
        measured = 0 if sensitivities is None else max(1, SENSITIVITY_TOKENS // ids.shape[1])  # windows
        for i in range(cfg.num_layers):
            stage = _Stage(builder, cal_options, spill, work, ids, layer=i)
            hessians = stage.capture(hidden, residual, reference_windows=measured)
            stage.quantize(hessians, options, scale_dtype, damp)
            if sensitivities is not None:
                sensitivities.update(stage.sensitivities(hidden, residual, hessians))
            hidden, residual = stage.forward(hidden, residual)
            log.info("calibrated layer %d of %d", i + 1, cfg.num_layers)
        if options.weights_calibration:  # the LM head, unless an 8-bit table (round-to-nearest) takes it
            final = _Stage(builder, cal_options, spill, work, ids, layer=None)
            hessians = final.capture(hidden, residual)
            if hessians:
                final.quantize(hessians, options, scale_dtype, damp)
    except BaseException:
        spill.close()
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return spill


class _Stage:
    """One decoder layer (or, with `layer=None`, the final norm and LM head) as its own graph."""

    def __init__(self, builder: Any, options: ExportOptions, spill: Spill, work: Path, ids: np.ndarray,
                 layer: int | str | None) -> None:
        self.builder, self.options, self.spill, self.work, self.ids, self.layer = \
            builder, options, spill, work, ids, layer
        self.linears: list[Linear] = []
        self.residual_is_input = False
        self._reference: list[np.ndarray] = []  # the fp32 layer's output (the residual stream), when measuring

    def _graph(self, capture: bool, has_residual: bool,
               float_keys: frozenset[str] = frozenset()) -> tuple[ir.Model, dict[str, str]]:
        """The stage's model and, when capturing, each linear's key → the graph output holding its input.

        `float_keys`: linears kept in fp32 in an int4 graph (sensitivity runs).
        """
        b, cfg = self.builder, self.builder.cfg
        # A fresh graph, weights and embedding tables per stage: values never cross graphs.
        b.g, b.w = GraphBuilder(), Weights(self.options, capture=capture)
        b.tables = QuantizedTables(self.options, b.w.io_dtype, b.w.np_dtype)
        b.w.precomputed = self.spill.loaders
        b.w.float_keys = float_keys
        g, io = b.g, b.w.io_dtype
        batch, length = "batch", self.ids.shape[1]  # runs take the windows a few at a time
        input_ids = g.input("input_ids", ir.DataType.INT64, [batch, length])
        mask = g.input("attention_mask", ir.DataType.INT64, [batch, length])
        if self.layer == "embedding":  # the family's own embedding (scaled, block-quantized, ...)
            with g.scope("model", "embed_tokens"):
                g.output(b.embedding(input_ids), "out", io, [batch, length, cfg.hidden_size])
            return g.model(producer_version="calibration"), {}
        hidden = g.input("hidden", io, [batch, length, cfg.hidden_size])
        residual = g.input("residual", io, [batch, length, cfg.hidden_size]) if has_residual else None
        if isinstance(self.layer, int):
            kv = [batch, cfg.num_kv_heads, "past", cfg.head_dim]
            past = (g.input("past_key", io, kv), g.input("past_value", io, kv))
            attn = b.model_inputs(input_ids, mask)
            with g.scope("model", f"layers.{self.layer}"):
                out, out_residual, _ = b.layer(self.layer, hidden, residual, attn, past)
            g.output(out, "out", io, [batch, length, cfg.hidden_size])  # capture: the fp32 reference
            self.residual_is_input = out_residual is hidden
            if out_residual is not out and not self.residual_is_input:
                g.output(out_residual, "out_residual", io, [batch, length, cfg.hidden_size])
        else:
            with g.scope("model", "norm"):
                normed = b.final_norm(hidden, residual)
            b.lm_head(normed)
        captured: dict[str, str] = {}
        if capture:
            assert b.w.linears is not None
            self.linears = b.w.linears
            names: dict[int, str] = {id(v): v.name for v in g.inputs}
            for lin in self.linears:
                if id(lin.x) not in names:
                    names[id(lin.x)] = f"x{len(names)}"
                    g.output(lin.x, names[id(lin.x)], io, [batch, length, lin.k])
                captured[lin.key] = names[id(lin.x)]
        b.w.flush(g)
        return g.model(producer_version="calibration"), captured

    def _run(self, model: ir.Model, hidden: np.ndarray | None, residual: np.ndarray | None,
             outputs: list[str], windows: int | None = None) -> Any:
        """Yield each run's results (dict name → array) over chunks of the calibration windows (the first
        `windows` of them, or all)."""
        import onnxruntime as ort

        path = self.work / "stage.onnx"
        ir.save(model, path, external_data="stage.onnx.data")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        wanted = {i.name for i in session.get_inputs()}
        batch, length = self.ids.shape
        batch = min(batch, windows or batch)
        step = max(1, RUN_TOKENS // length)
        cfg = self.builder.cfg
        for start in range(0, batch, step):
            rows = slice(start, min(start + step, batch))
            n = self.ids[rows].shape[0]
            empty = np.zeros((n, cfg.num_kv_heads, 0, cfg.head_dim), np.float32)
            feeds = {"input_ids": self.ids[rows], "attention_mask": np.ones_like(self.ids[rows]),
                     "past_key": empty, "past_value": empty}
            if hidden is not None:
                feeds["hidden"] = hidden[rows]
            if residual is not None:
                feeds["residual"] = residual[rows]
            inputs = {k: v for k, v in feeds.items() if k in wanted}
            names = [o for o in outputs if o not in inputs]
            yield {**inputs, **dict(zip(names, session.run(names, inputs), strict=True))}
        del session

    def capture(self, hidden: np.ndarray, residual: np.ndarray | None,
                reference_windows: int = 0) -> dict[str, Hessian]:
        """Each linear's Hessian over the calibration tokens, layer in fp32 (an empty dict when the stage has
        no linear to quantize). The layer's fp32 output on the first `reference_windows` windows is kept
        for `sensitivities`."""
        model, captured = self._graph(capture=True, has_residual=residual is not None)
        if not self.linears:
            return {}
        hessians = {name: Hessian(lin.k) for lin, name in ((lin, captured[lin.key]) for lin in self.linears)}
        streams = [v.name for v in model.graph.outputs if v.name in ("out", "out_residual")] \
            if reference_windows else []
        done = 0
        for results in self._run(model, hidden, residual, list(hessians) + streams):
            for name, hessian in hessians.items():
                hessian.add(results[name])
            if done < reference_windows:
                self._reference.append(self._stream(results)[: reference_windows - done])
                done += len(self._reference[-1])
        return {lin.key: hessians[captured[lin.key]] for lin in self.linears}

    def quantize(self, hessians: dict[str, Hessian], options: ExportOptions, scale_dtype: type,
                 damp: float) -> None:
        """Quantize this stage's linears and keep the results."""
        factors: dict[int, Factor] = {}  # by Hessian: linears reading the same input share its factor
        for lin in self.linears:
            weight = lin.load()
            h = hessians[lin.key]
            if options.algo == "gptq":
                if id(h) not in factors:
                    factors[id(h)] = gptq_factor(h.sum32, options.block_size, damp, act_order=GPTQ_ACT_ORDER)
                q = quantize_gptq(weight, None, options.block_size, options.symmetric, scale_dtype=scale_dtype,
                                  search=GPTQ_SEARCH, factor=factors[id(h)])
            elif options.algo == "clip":  # weighted by the activations only when a text was given for it
                importance = h.mean_square if options.calibration is not None else None
                q = quantize_clip(weight, options.block_size, options.symmetric, importance=importance,
                                  scale_dtype=scale_dtype)
            else:  # rtn under mixed precision: calibration only measures
                q = quantize_int4(weight, options.block_size, options.symmetric)
            self.spill.put(lin.key, q)
            del weight

    def _stream(self, results: dict[str, np.ndarray]) -> np.ndarray:
        """The residual stream after the layer (what every later layer adds to) from a run's results."""
        if "out_residual" in results:
            return results["out"] + results["out_residual"]
        if self.residual_is_input:
            return results["out"] + results["hidden"]
        return results["out"]

    def sensitivities(self, hidden: np.ndarray, residual: np.ndarray | None,
                      hessians: dict[str, Hessian]) -> dict[str, Sensitivity]:
        """Per linear of this layer: the layer's output error with only that linear in int4, relative to the
        fp32 layer's output (captured by `capture`), and what 8 bits would leave of it."""
        reference = np.concatenate(self._reference)
        windows = len(reference)
        energy = float(np.square(reference, dtype=np.float64).sum())
        keys = frozenset(lin.key for lin in self.linears)
        out: dict[str, Sensitivity] = {}
        for lin in self.linears:
            model, _ = self._graph(capture=False, has_residual=residual is not None, float_keys=keys - {lin.key})
            names = ["out"] + (["out_residual"] if any(v.name == "out_residual" for v in model.graph.outputs) else [])
            error, done = 0.0, 0
            for results in self._run(model, hidden, residual, names, windows=windows):
                stream = self._stream(results)
                error += float(np.square(stream - reference[done:done + len(stream)], dtype=np.float64).sum())
                done += len(stream)
            out[lin.key] = sensitivity(lin.load(), self.spill.loaders[lin.key](), hessians[lin.key],
                                       error / max(energy, 1e-30), self.options)
        self._reference = []
        return out

    def forward(self, hidden: np.ndarray | None, residual: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """The layer's outputs with its int4 weights: the next layer's inputs."""
        model, _ = self._graph(capture=False, has_residual=residual is not None)
        names = ["out"] + (["out_residual"] if any(v.name == "out_residual" for v in model.graph.outputs) else [])
        outs: list[np.ndarray] = []
        residuals: list[np.ndarray] = []
        for results in self._run(model, hidden, residual, names):
            outs.append(results["out"])
            residuals.append(results["hidden"] if self.residual_is_input
                             else results.get("out_residual", results["out"]))
        return np.concatenate(outs), np.concatenate(residuals)


def prepare_int4(builder: Any, source: Path, model: ir.Model) -> tuple[dict[str, Any] | None, ir.Model]:
    """Run calibration when the export's int4 algorithm or mixed precision needs it; returns the manifest's
    record and the model to write (`model`, or the graph built again with the projections mixed precision
    keeps at 8 bits).

    The results go into `builder.w.precomputed`, read when the model is written.
    """
    from phi_onnx.quantize.calibration import load_calibration

    opts: ExportOptions = builder.options
    if opts.precision != "int4":
        return None, model
    record: dict[str, Any] = {"algo": opts.algo, "block_size": opts.block_size, "symmetric": opts.symmetric,
                              "embeddings": opts.resolved_embeddings, "lm_head_bits": opts.resolved_lm_head_bits}
    if not opts.calibrates:
        return record, model
    converted = Path(tempfile.mkdtemp(prefix="phi-onnx-tokenizer-"))
    try:
        calibration = load_calibration(opts.calibration, _tokenizer_json(builder, source, converted),
                                       opts.resolved_calibration_tokens)
    finally:
        shutil.rmtree(converted, ignore_errors=True)
    log.info("Calibrating %s int4%s on %d tokens (%s)", opts.algo, " with mixed precision" if opts.mix == "auto"
             else "", calibration.tokens, calibration.source)
    sensitivities: dict[str, Sensitivity] | None = {} if opts.mix == "auto" else None
    spill = calibrate(type(builder), builder.cfg, builder.ckpt, opts, calibration, sensitivities=sensitivities)
    builder.w.precomputed = spill.loaders
    builder.w.spill = spill  # keeps the results' folder until the weights are written
    record["calibration"] = calibration.record()
    if opts.algo == "gptq":
        record.update(damp=DAMP, order="act-order, static groups" if GPTQ_ACT_ORDER else "natural",
                      lazy_batch=LAZY_BATCH)
    if sensitivities is not None:
        base = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
        chosen = choose_eight_bit(sensitivities, opts.resolved_mix_budget * base)
        tokens = min(calibration.tokens, max(1, SENSITIVITY_TOKENS // calibration.ids.shape[1])
                     * calibration.ids.shape[1])
        record["mix"] = mix_record(sensitivities, chosen, base, opts.resolved_mix_budget, tokens)
        log.info("Mixed precision: %d of %d projections at 8 bits (+%.1f %%)", len(chosen), len(sensitivities),
                 100 * record["mix"]["added_fraction"])
        if chosen:
            model = _rebuild(builder, frozenset(chosen))
    return record, model


def _rebuild(builder: Any, eight_bit: frozenset[str]) -> ir.Model:
    """The export's graph again, with the projections `eight_bit` as 8-bit MatMulNBits (weights stay lazy;
    the int4 results already computed are reused)."""
    weights = Weights(builder.options)
    weights.precomputed, weights.spill, weights.eight_bit = builder.w.precomputed, builder.w.spill, eight_bit
    builder.g, builder.w = GraphBuilder(), weights
    builder.tables = QuantizedTables(builder.options, weights.io_dtype, weights.np_dtype)
    return builder.build()


def _tokenizer_json(builder: Any, source: Path, converted: Path) -> Path:
    """The model's tokenizer.json (Phi-3-small's is converted from tiktoken by its builder)."""
    from phi_onnx.errors import OptionsError

    if (source / "tokenizer.json").is_file():
        return source / "tokenizer.json"
    builder.write_assets(source, converted)
    if (converted / "tokenizer.json").is_file():
        return converted / "tokenizer.json"
    raise OptionsError(f"{source} has no tokenizer.json to tokenize the calibration text with.",
                       hint="Add the model's tokenizer.json to the checkpoint folder, or use --algo rtn/clip.")
