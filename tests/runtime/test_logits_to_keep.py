"""The ort backend's in-memory graph computes the LM head only on the positions it is asked for,
with the same numbers as the export on disk (which keeps every position for genai and verify)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from helpers import random_ids

import phi_onnx
from phi_onnx.runtime.logits_to_keep import INPUT, add_logits_to_keep


def feeds(folder, ids: np.ndarray) -> dict[str, np.ndarray]:
    """Prefill inputs with an empty cache."""
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    out = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    for value in model.graph.input:
        if value.name.startswith("past_key_values."):
            dims = [d.dim_value or 0 for d in value.type.tensor_type.shape.dim]
            out[value.name] = np.zeros([ids.shape[0], dims[1], 0, dims[3]], np.float32)
    return out


def sessions(folder) -> tuple[ort.InferenceSession, ort.InferenceSession]:
    """The export as written, and the rewritten copy (weights read from the same folder)."""
    options = ort.SessionOptions()
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
    graph = add_logits_to_keep(folder / "model.onnx")
    assert graph is not None
    return (ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"]),
            ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"]))


@pytest.mark.parametrize(("name", "precision"), [("phi3-gqa", "fp32"), ("phi4mini", "fp32"), ("phi3-mha", "int4")])
def test_kept_positions_equal_the_full_graph(name, precision, make_export):
    folder = make_export(name, precision)
    full, kept = sessions(folder)
    ids = np.concatenate([random_ids(12, seed=3), random_ids(12, seed=4)])
    inputs = feeds(folder, ids)
    everything = full.run(["logits"], inputs)[0]
    for keep in (1, 5):
        logits = kept.run(["logits"], {**inputs, INPUT: np.array(keep)})[0]
        assert logits.shape == (2, keep, everything.shape[2])
        np.testing.assert_allclose(logits, everything[:, -keep:], atol=1e-4, rtol=0)
    # Asking for more positions than there are returns them all.
    np.testing.assert_allclose(kept.run(["logits"], {**inputs, INPUT: np.array(100)})[0], everything,
                               atol=1e-4, rtol=0)


def test_ort_backend_uses_it_and_the_export_is_untouched(make_export):
    folder = make_export("phi3-mha")
    before = (folder / "model.onnx").read_bytes()
    model = phi_onnx.load(folder, backend="ort", device="cpu")
    try:
        assert model.engine.keeps_logits
        assert model.generate(random_ids(40, seed=5)[0].tolist(), max_new_tokens=4).new_tokens >= 1
    finally:
        model.close()
    assert (folder / "model.onnx").read_bytes() == before
    assert INPUT not in {i.name for i in onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.input}


def test_falls_back_to_the_file_when_the_copy_cannot_load(make_export, monkeypatch):
    import phi_onnx.runtime.core as core

    monkeypatch.setattr(core, "add_logits_to_keep", lambda path: b"not an onnx model")
    folder = make_export("phi3-mha")
    model = phi_onnx.load(folder, backend="ort", device="cpu")
    try:
        assert not model.engine.keeps_logits
        assert model.generate(random_ids(10, seed=6)[0].tolist(), max_new_tokens=3).new_tokens >= 1
    finally:
        model.close()


def test_graph_without_a_matmul_head_is_left_alone(tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    def head_graph(*nodes) -> bytes | None:
        value = helper.make_tensor_value_info
        graph = helper.make_graph(
            list(nodes), "g", [value("x", TensorProto.FLOAT, [1, 2, 3]), value("m", TensorProto.FLOAT, [1, 2, 4])],
            [value("logits", TensorProto.FLOAT, [1, 2, 4])],
            [numpy_helper.from_array(np.ones((3, 4), np.float32), "w")])
        onnx.save(helper.make_model(graph), tmp_path / "model.onnx")
        return add_logits_to_keep(tmp_path / "model.onnx")

    assert head_graph(helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Cast", ["y"], ["logits"], to=1))
    # Not a projection, or a per-position graph input mixed into the logits: every position is kept.
    assert head_graph(helper.make_node("Identity", ["m"], ["logits"])) is None
    assert head_graph(helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Mul", ["y", "m"], ["logits"])) \
        is None
