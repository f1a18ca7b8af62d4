"""onnxruntime-genai as the forward engine: its KV cache and session, our sampler and stop rules.

We feed tokens with `append_tokens` and read `get_logits`, so the choice of each token (and the
stop strings, EOS ids, penalties) is the same code as the ort backend's, and `rewind_to` gives
prefix reuse across chat turns and the LongRoPE recompute that genai's own loop lacks.

Measured on onnxruntime-genai 0.18: `og.Config(dir); cfg.clear_providers()` runs a model on CPU
whatever its genai_config targets; `og.is_cuda_available()` is True even without a GPU; a CUDA
provider on a CPU-only install fails hard ("Cuda interface not available") — so CUDA is only
attempted after the ONNX Runtime probe found a working CUDA EP.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from phi_onnx.runtime.engine import CachedEngine, round_capacity
from phi_onnx.runtime.errors import DeviceError, ModelFolderError
from phi_onnx.runtime.folder import REEXPORT_HINT, ModelFolder
from phi_onnx.runtime.providers import CPU, CUDA, DeviceChoice

log = logging.getLogger(__name__)


def genai_available() -> bool:
    """Whether onnxruntime-genai can be imported."""
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        return False
    return True


class GenaiEngine(CachedEngine):
    """One onnxruntime-genai Generator per KV allocation, driven token by token."""

    backend = "genai"
    max_batch = 1

    def __init__(self, folder: ModelFolder, device: DeviceChoice, *, threads: int | None = None) -> None:
        import onnxruntime_genai as og

        super().__init__(folder.long_context_threshold)
        self.og = og
        self.folder = folder
        try:
            # In the try too: onnxruntime-genai parses genai_config.json here, strictly (an unknown key
            # read_folder lets through, for the ort backend, is an error to it).
            config = og.Config(str(folder.path))
            config.clear_providers()  # CPU unless we add CUDA: genai_config may target the other one
            if device.kind == "cuda":
                config.append_provider("cuda")
                config.set_provider_option("cuda", "device_id", str(device.device_id))
            if threads:
                config.overlay(json.dumps({"model": {"decoder": {"session_options": {
                    "intra_op_num_threads": threads}}}}))
            self.model = og.Model(config)
        except Exception as error:  # genai raises RuntimeError/OrtException with ORT's message
            if device.kind == "cuda":
                raise DeviceError(f"onnxruntime-genai cannot run on CUDA: {error}",
                                  hint="Install onnxruntime-genai-cuda (pip install \"phi-onnx[cuda]\"), "
                                       "or use backend='ort'.") from error
            raise ModelFolderError(f"onnxruntime-genai could not load {folder.path}: {error}",
                                   hint=REEXPORT_HINT) from error
        self.provider = CUDA if device.kind == "cuda" else CPU
        self.generator: Any = None
        self.capacity = 0

    def prepare(self, batch: int, capacity: int) -> None:
        """A new Generator (empty cache) when `capacity` exceeds the current one's max_length."""
        if batch != 1:
            raise ValueError("the genai backend runs one sequence at a time")
        if self.generator is not None and capacity <= self.capacity:
            return
        capacity = round_capacity(capacity, self.folder.context_length)
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=capacity, do_sample=False, batch_size=1)
        self.generator = self.og.Generator(self.model, params)
        self.capacity = capacity
        self.forget()

    def _forward(self, tokens: Sequence[int], past: int) -> np.ndarray:
        generator = self.generator
        if generator.token_count() != past:
            generator.rewind_to(past)
        generator.append_tokens(np.asarray(tokens, dtype=np.int32))
        return np.asarray(generator.get_logits(), dtype=np.float32).reshape(-1, self.folder.vocab_size)[-1]

    def forget(self) -> None:
        """Drop the cached tokens (the next run rewinds the generator to 0)."""
        super().forget()
        if getattr(self, "generator", None) is not None and self.generator.token_count():
            try:
                self.generator.rewind_to(0)
            except Exception:  # a generator broken by an interrupted run: start a new one next time
                self.generator = None
                self.capacity = 0

    def close(self) -> None:
        """Release the generator and model."""
        self.generator = None
        self.capacity = 0
        super().forget()
