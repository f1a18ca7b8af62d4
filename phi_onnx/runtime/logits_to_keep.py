"""Give the ort backend's copy of the graph a `logits_to_keep` input, as transformers' forward has.

An export's `logits` output covers every position, because verification and onnxruntime-genai read
them that way. Generation needs only the last one, and the LM head over a whole prompt is a large
share of prefill (vocab × hidden per position: measured 10 % of a 128-token prefill on a
0.95B Phi-3 int4 export). The ort backend therefore runs a copy of the graph, rewritten in memory
at load time, whose LM head reads only the last `logits_to_keep` positions of the final hidden
state. The export on disk stays as it is, so onnxruntime-genai and `phi-onnx verify` are unaffected,
and an ONNX input with a default value is not needed (ORT warns on every load about those).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

INPUT = "logits_to_keep"
#: Element-wise ops that may sit between the LM head's projection and the `logits` output (bias,
#: fp16 → fp32, Phi-3-small's muP division and its mask of unused ids). With constant other inputs
#: they act on each position alone, so they commute with dropping positions before the head.
_PASS_THROUGH = {"Cast", "Add", "Sub", "Mul", "Div", "Where"}
_PROJECTIONS = {"MatMul", "MatMulNBits"}


def add_logits_to_keep(path: Path) -> bytes | None:
    """model.onnx (structure only; weights stay external) with an int64 scalar input `logits_to_keep`:
    the LM head runs on the last `logits_to_keep` positions only (all of them when it is ≥ the
    sequence length). None when the graph's LM head is not the shape phi-onnx writes."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    if any(i.name == INPUT for i in graph.input):
        return None
    producer = {out: node for node in graph.node for out in node.output if node.op_type != "Constant"}
    constant = {init.name for init in graph.initializer} | {""} | {
        out for node in graph.node if node.op_type == "Constant" for out in node.output}
    head = producer.get("logits")
    while head is not None and head.op_type in _PASS_THROUGH:
        computed = [name for name in head.input if name not in constant]
        head = producer.get(computed[0]) if len(computed) == 1 else None
    if head is None or head.op_type not in _PROJECTIONS:
        log.debug("logits are not produced by a MatMul LM head; the ort backend computes every position")
        return None
    hidden = head.input[0]
    scope = "/logits_to_keep/"
    graph.input.append(helper.make_tensor_value_info(INPUT, onnx.TensorProto.INT64, []))
    graph.initializer.extend([
        numpy_helper.from_array(np.array([0], np.int64), scope + "zero"),
        numpy_helper.from_array(np.array([1], np.int64), scope + "axis"),
        numpy_helper.from_array(np.array([np.iinfo(np.int64).max], np.int64), scope + "end"),
    ])
    nodes = [
        helper.make_node("Shape", [hidden], [scope + "length"], start=1, end=2, name=scope + "Shape"),
        helper.make_node("Unsqueeze", [INPUT, scope + "zero"], [scope + "keep"], name=scope + "Unsqueeze"),
        helper.make_node("Sub", [scope + "length", scope + "keep"], [scope + "first"], name=scope + "Sub"),
        helper.make_node("Max", [scope + "first", scope + "zero"], [scope + "start"], name=scope + "Max"),
        helper.make_node("Slice", [hidden, scope + "start", scope + "end", scope + "axis"], [scope + "hidden"],
                         name=scope + "Slice"),
    ]
    head.input[0] = scope + "hidden"
    position = list(graph.node).index(head)
    for offset, node in enumerate(nodes):
        graph.node.insert(position + offset, node)
    return model.SerializeToString()
