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
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from phi_onnx.runtime.engine import round_capacity
from phi_onnx.runtime.errors import DeviceError, ModelFolderError, OptionsError
from phi_onnx.runtime.folder import REEXPORT_HINT, ModelFolder
from phi_onnx.runtime.longrope import LongRope
from phi_onnx.runtime.providers import CPU, CUDA, DeviceChoice

log = logging.getLogger(__name__)


def genai_available() -> bool:
    """Whether onnxruntime-genai can be imported."""
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        return False
    return True


class GenaiEngine:
    """One onnxruntime-genai Generator per KV allocation, driven token by token (batch 1)."""

    backend = "genai"
    max_batch: int | None = 1

    def __init__(self, folder: ModelFolder, device: DeviceChoice, *, threads: int | None = None) -> None:
        import onnxruntime_genai as og

        self.rope = LongRope(folder.long_context_threshold)
        self.held: list[int] = []  # tokens whose keys/values the generator holds
        self.long = False  # whether those entries were computed with LongRoPE's long factors
        self.recomputes = 0
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
        self.adapter: str | None = None  # the switchable LoRA adapter the generator runs
        self._adapters: Any = None  # og.Adapters, with the files loaded so far
        self._loaded: set[str] = set()

    def _prepare(self, capacity: int) -> None:
        """A new Generator (empty cache) when `capacity` exceeds the current one's max_length."""
        if self.generator is not None and capacity <= self.capacity:
            return
        capacity = round_capacity(capacity, self.folder.context_length)
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=capacity, do_sample=False, batch_size=1)
        self.generator = self.og.Generator(self.model, params)
        if self.adapter is not None:
            self.generator.set_active_adapter(self._adapters, self.adapter)
        self.capacity = capacity
        self.held, self.long = [], False

    def start(self, prompts: Sequence[Sequence[int]], capacity: int, *,
              adapter: str | None = None) -> tuple[np.ndarray, int]:
        """Run one prompt with switchable LoRA `adapter` (None: the base), reusing the prefix the generator
        holds; (last logits [1, vocab], cached tokens)."""
        if len(prompts) != 1:
            raise ValueError("the genai backend runs one sequence at a time")  # Model runs batches one by one
        if adapter != self.adapter:
            self._use_adapter(adapter)
        self._prepare(capacity)
        prompt = prompts[0]
        cached = self.rope.reusable(self.held, self.long, prompt)
        if not cached and self.held and self.rope.must_recompute(self.long, len(prompt)):
            self.recomputes += 1
        return self._extend(prompt, cached)[None], cached

    def step(self, tokens: Mapping[int, Sequence[int]]) -> Mapping[int, np.ndarray]:
        """Add the row's new tokens (several, after a grammar's fast-forward, in one `append_tokens`); a
        sequence crossing the LongRoPE switch runs again from empty (long factors)."""
        sequence = [*self.held, *tokens[0]]
        past = len(self.held)
        if self.rope.must_recompute(self.long, len(sequence)):
            self.recomputes += 1
            log.debug("LongRoPE: %d tokens pass the original context %s; recomputing the cache with the "
                      "long factors", len(sequence), self.rope.threshold)
            past = 0
        return {0: self._extend(sequence, past)}

    def _extend(self, tokens: Sequence[int], past: int) -> np.ndarray:
        """Run `tokens[past:]` after the first `past` held ones; the last logits [vocab]."""
        try:
            generator = self.generator
            if generator.token_count() != past:
                generator.rewind_to(past)
            generator.append_tokens(np.asarray(tokens[past:], dtype=np.int32))
            logits = np.asarray(generator.get_logits(), dtype=np.float32).reshape(-1, self.folder.vocab_size)[-1]
        except BaseException:
            self.forget()  # an interrupted run may have written part of the cache
            raise
        if not past:
            self.long = self.rope.is_long(len(tokens))
        self.held = [int(t) for t in tokens]
        return logits

    def _use_adapter(self, name: str | None) -> None:
        """A new generator (empty cache) running adapter `name`, loaded into onnxruntime-genai's Adapters."""
        from phi_onnx.export.lora import SUFFIX, read_index

        if name is not None:
            index = read_index(self.folder.path)
            names = sorted(index["adapters"]) if index is not None else []
            if name not in names:
                raise OptionsError(f"This model has no adapter {name!r} (its adapters: {', '.join(names) or 'none'}).",
                                   hint="Pick one of them, or drop the adapter option.")
            if self._adapters is None:
                self._adapters = self.og.Adapters(self.model)
            if name not in self._loaded:
                self._adapters.load(str(self.folder.path / f"{name}{SUFFIX}"), name)
                self._loaded.add(name)
        self.adapter = name
        self.generator, self.capacity = None, 0
        self.held, self.long = [], False

    def forget(self) -> None:
        """Drop the held tokens (the next run rewinds the generator to 0)."""
        self.held, self.long = [], False
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
        self.held, self.long = [], False
