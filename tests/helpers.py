"""Helpers shared by tests: random prompts and a bare onnxruntime loop with a KV cache."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort


class OnnxLM:
    """Runs an exported model.onnx on CPU and keeps its KV cache between calls."""

    def __init__(self, folder: Path) -> None:
        self.session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.past_inputs = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values")]
        # Shapes from genai_config, so graphs with symbolic KV dims (other exporters') work too.
        decoder = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
        self.kv_heads, self.head_size = decoder["num_key_value_heads"], decoder["head_size"]
        self.reset()

    def reset(self) -> None:
        """Forget the cache."""
        self.past: dict[str, np.ndarray] = {}
        self.length = 0

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        """Feed `ids` [1, n] after the cached tokens; returns logits [1, n, vocab]."""
        feeds: dict[str, np.ndarray] = {"input_ids": ids,
                                        "attention_mask": np.ones((1, self.length + ids.shape[1]), np.int64)}
        for spec in self.past_inputs:
            dtype = np.float16 if "float16" in spec.type else np.float32
            feeds[spec.name] = self.past.get(spec.name, np.zeros((1, self.kv_heads, 0, self.head_size), dtype))
        results = dict(zip(self.outputs, self.session.run(None, feeds), strict=False))
        self.past = {name.replace("present", "past_key_values"): value
                     for name, value in results.items() if name.startswith("present")}
        self.length += ids.shape[1]
        return results["logits"]


def random_ids(n: int, seed: int = 0, low: int = 10, high: int = 990) -> np.ndarray:
    """A [1, n] int64 prompt of random token ids."""
    return np.random.default_rng(seed).integers(low, high, size=(1, n), dtype=np.int64)
