"""Our own loop on plain onnxruntime: prefill, decode with the KV cache, batched rows.

The KV cache is one preallocated buffer per layer and key/value, [batch, kv_heads, capacity,
head_dim], bound with IO binding as both `past_key_values.N.*` and `present.N.*`: GroupQueryAttention
sees the same memory on both sides and writes each step's keys in place (`seqlens_k` from the
attention mask says how much is valid), so nothing is copied between steps, and on CUDA the cache
never leaves the device. Rows of a batch are right-padded: GroupQueryAttention places row b's new
tokens right after its own valid length.

The session runs a copy of the graph whose LM head computes only the positions asked for
(`logits_to_keep`): the last one in prefill, one per row's last token in a batch.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from phi_onnx.runtime.engine import CachedEngine, round_capacity
from phi_onnx.runtime.errors import DeviceError, ModelFolderError
from phi_onnx.runtime.folder import REEXPORT_HINT, ModelFolder
from phi_onnx.runtime.logits_to_keep import INPUT as LOGITS_TO_KEEP
from phi_onnx.runtime.logits_to_keep import add_logits_to_keep
from phi_onnx.runtime.providers import CUDA, INSTALL_CUDA_HINT, DeviceChoice

log = logging.getLogger(__name__)

#: Prompts are run in chunks whose logits stay under this size, for graphs that return every position's.
LOGITS_BUDGET_BYTES = 256 * 1024 * 1024
#: Longest prompt chunk: GroupQueryAttention on CPU holds [heads, chunk, total] attention scores.
MAX_CHUNK = 2048


class OrtEngine(CachedEngine):
    """model.onnx in one onnxruntime InferenceSession, driven with IO binding."""

    backend = "ort"

    def __init__(self, folder: ModelFolder, device: DeviceChoice, *, threads: int | None = None) -> None:
        import onnxruntime as ort

        super().__init__(folder.long_context_threshold)
        self.folder = folder
        self.device = device
        def options() -> Any:
            made = ort.SessionOptions()
            if threads:
                made.intra_op_num_threads = threads
            return made

        self.session: Any = None
        try:
            graph = add_logits_to_keep(folder.model_path)
            if graph is not None:
                rewritten = options()
                # The copy is loaded from memory; its weights stay in the folder's external data.
                rewritten.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                                   str(folder.path))
                try:
                    self.session = ort.InferenceSession(graph, rewritten, providers=device.ort_providers())
                except Exception as error:  # e.g. an onnxruntime without that config entry
                    log.debug("the graph with logits_to_keep did not load (%s); using model.onnx as written", error)
            if self.session is None:
                self.session = ort.InferenceSession(str(folder.model_path), options(),
                                                    providers=device.ort_providers())
        except Exception as error:  # onnxruntime raises its own Fail/InvalidProtobuf/... types
            raise ModelFolderError(f"ONNX Runtime could not load {folder.model_path}: {error}",
                                   hint=REEXPORT_HINT) from error
        self.provider = self.session.get_providers()[0]
        if device.kind == "cuda" and self.provider != CUDA:
            raise DeviceError(f"onnxruntime created the session on {self.provider}, not CUDA.",
                              hint=INSTALL_CUDA_HINT)
        names = {i.name for i in self.session.get_inputs()}
        self.kv_names = [(f"past_key_values.{i}.{kind}", f"present.{i}.{kind}")
                         for i in range(folder.num_layers) for kind in ("key", "value")]
        missing = [past for past, _ in self.kv_names if past not in names]
        if missing:
            raise ModelFolderError(f"model.onnx lacks {missing[0]} although genai_config.json lists "
                                   f"{folder.num_layers} layers.", hint=REEXPORT_HINT)
        self.vocab = folder.vocab_size
        self.keeps_logits = LOGITS_TO_KEEP in names
        self.chunk = MAX_CHUNK if self.keeps_logits else int(
            np.clip(LOGITS_BUDGET_BYTES // (4 * self.vocab), 64, MAX_CHUNK))
        self.binding: Any = None
        self.buffers: list[Any] = []
        self._host: list[np.ndarray] = []
        self.batch = 0
        self.capacity = 0
        self.max_batch = None

    def prepare(self, batch: int, capacity: int) -> None:
        """(Re)allocate the shared KV buffers when the batch changes or `capacity` does not fit."""
        if batch == self.batch and capacity <= self.capacity:
            return
        import onnxruntime as ort

        folder = self.folder
        capacity = round_capacity(capacity, folder.context_length if capacity <= folder.context_length else None)
        shape = [batch, folder.num_kv_heads, capacity, folder.head_size]
        location = "cuda" if self.device.kind == "cuda" else "cpu"
        self.buffers, self._host = [], []
        self.binding = self.session.io_binding()
        for past, present in self.kv_names:
            # Zeroed, not uninitialised: a kernel that reads past the valid length and masks
            # afterwards would turn stale NaN bit patterns into NaN outputs.
            zeros = np.zeros(shape, dtype=folder.kv_dtype)  # calloc: pages are touched only when written
            buffer = ort.OrtValue.ortvalue_from_numpy(zeros, location, self.device.device_id)
            if location == "cpu":
                self._host.append(zeros)  # the OrtValue borrows this memory
            self.binding.bind_ortvalue_input(past, buffer)
            self.binding.bind_ortvalue_output(present, buffer)  # same memory: GQA shares past and present
            self.buffers.append(buffer)
        self.batch, self.capacity = batch, capacity
        self.forget()
        log.debug("KV cache: %d x %s %s on %s", len(self.buffers), shape, folder.kv_dtype, location)

    def _run(self, input_ids: np.ndarray, valid: np.ndarray, keep: int) -> np.ndarray:
        """One session run; row b holds `valid[b]` tokens afterwards. Returns the logits of the last
        `keep` positions [batch, keep, vocab] (of every position when the graph cannot choose)."""
        batch, seq = input_ids.shape
        width = int(valid.max())
        if width > self.capacity:
            raise RuntimeError(f"KV cache of {self.capacity} tokens cannot hold {width}")  # a bug, not user error
        mask = (np.arange(width)[None, :] < valid[:, None]).astype(np.int64)
        keep = min(keep, seq) if self.keeps_logits else seq
        logits = np.empty((batch, keep, self.vocab), dtype=np.float32)
        self.binding.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, dtype=np.int64))
        self.binding.bind_cpu_input("attention_mask", mask)
        if self.keeps_logits:
            self.binding.bind_cpu_input(LOGITS_TO_KEEP, np.array(keep, dtype=np.int64))
        self.binding.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        self.session.run_with_iobinding(self.binding)
        return logits

    def _forward(self, tokens: Sequence[int], past: int) -> np.ndarray:
        """Batch 1: run `tokens` after `past` cached ones, in chunks; last logits [vocab]."""
        if self.batch != 1:
            self.prepare(1, past + len(tokens))
        ids = np.asarray(tokens, dtype=np.int64)
        logits = None
        for start, end in self._chunks(past, past + len(ids)):
            logits = self._run(ids[None, start - past:end - past], np.array([end]), keep=1)
        assert logits is not None
        return logits[0, -1]

    def _chunks(self, start: int, end: int) -> list[tuple[int, int]]:
        """Chunk bounds for running positions [start, end). From an empty cache, a sequence that ends
        past the LongRoPE switch gets a first chunk that already crosses it, so every entry is computed
        with the same (long) factors, as a single run would."""
        bounds = []
        first = start + self.chunk
        if start == 0 and self.is_long(end) and self.long_threshold is not None:
            first = max(first, self.long_threshold + 1)
        while start < end:
            stop = min(end, first if not bounds else start + self.chunk)
            bounds.append((start, stop))
            start = stop
        return bounds

    def forward_rows(self, rows: Sequence[Sequence[int]], pasts: Sequence[int]) -> np.ndarray:
        """Batched step, right-padded: either every row starts empty (prefill) or adds one token (decode)."""
        lengths = np.array([len(r) for r in rows])
        seq = int(lengths.max())
        if any(pasts) and seq > 1:
            raise ValueError("a batched step with a cache must add one token per row")  # GQA's rule
        ids = np.full((len(rows), seq), self.folder.pad_token_id, dtype=np.int64)
        for b, row in enumerate(rows):
            ids[b, : len(row)] = row
        valid = np.asarray(pasts) + lengths
        keep = seq - int(lengths.min()) + 1  # from the shortest row's last token to the end
        try:
            logits = self._run(ids, valid, keep)
        finally:
            self.forget()  # the batch-1 prefix bookkeeping does not describe batched buffers
        return logits[np.arange(len(rows)), lengths - 1 - (seq - logits.shape[1])]

    def close(self) -> None:
        """Free the KV buffers and the session."""
        self.binding = None
        self.buffers, self._host = [], []
        self.batch = self.capacity = 0
        self.forget()
