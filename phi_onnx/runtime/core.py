"""The decode core of the ort backend: one session, one way to run it, prefill and decode over a KVPool.

`Model` (one request or a static batch, on the caller's thread) and the `Scheduler` (continuous
batching on its own thread) both drive a `DecodeCore`; each owns its own `KVPool`. Everything that
touches ONNX Runtime is here:

- `run`: one session run over slots [lo, hi) of a pool (IO binding, the attention mask from each
  row's valid length, `logits_to_keep`, logits to the host);
- `prefill`: a slot's next prompt chunk(s), batch 1 (GroupQueryAttention needs batch 1 for more than
  one new token over a past), chunked as the LongRoPE rule says;
- `prefill_batch`: several empty slots' prompts in one right-padded run (a static batch);
- `extend`: several new tokens of one slot (a grammar's forced tokens), batch 1 like a prefill chunk;
- `decode`: one new token for each of several slots, rows grouped into runs by their run key
  (`LongRope.key`) and contiguous slot ranges; a slot that crosses the LongRoPE switch is
  recomputed from empty first.

Which tokens each slot holds is the pool's bookkeeping (`KVPool.held`), updated here after each run.
An export with switchable LoRA adapters runs each slot with its own (`KVPool.adapter`, set by the
caller when it fills the slot): `run` binds the stack of the adapters its rows use and each row's index
(`runtime.lora.LoraBank`), so rows with different adapters share runs and the run key needs no adapter.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from phi_onnx.export.lora import INDEX as LORA_INDEX
from phi_onnx.runtime.errors import DeviceError, ModelFolderError, OptionsError
from phi_onnx.runtime.folder import REEXPORT_HINT, ModelFolder
from phi_onnx.runtime.kv_pool import KVLayout, KVPool
from phi_onnx.runtime.logits_to_keep import INPUT as LOGITS_TO_KEEP
from phi_onnx.runtime.logits_to_keep import add_logits_to_keep
from phi_onnx.runtime.longrope import LongRope
from phi_onnx.runtime.lora import LoraBank, require_lora_inputs
from phi_onnx.runtime.providers import CUDA, INSTALL_CUDA_HINT, DeviceChoice

log = logging.getLogger(__name__)

#: Prompts are run in chunks whose logits stay under this size, for graphs that return every position's.
LOGITS_BUDGET_BYTES = 256 * 1024 * 1024
#: Longest prompt chunk: GroupQueryAttention on CPU holds [heads, chunk, total] attention scores.
MAX_CHUNK = 2048
#: Most idle slots a decode run on CPU bridges: each costs about a row's share of the weight pass (a prompt
#: token's work), a second run about a one-row step (one whole pass, ~4-5 tokens' work on the CPUs measured).
#: On a GPU a row is nearly free beside a pass over the weights: runs bridge any gap there.
MAX_IDLE_GAP = 3


class DecodeCore:
    """model.onnx in one onnxruntime InferenceSession, run over KV pools.

    Args:
        folder: the export.
        device: where to run (a resolved DeviceChoice).
        threads: intra-op threads (None: ONNX Runtime's default, one per physical core).
    """

    def __init__(self, folder: ModelFolder, device: DeviceChoice, *, threads: int | None = None) -> None:
        self.folder = folder
        self.device = device
        self.session = _session(folder, device, threads)
        self.provider: str = self.session.get_providers()[0]
        if device.kind == "cuda" and self.provider != CUDA:
            raise DeviceError(f"onnxruntime created the session on {self.provider}, not CUDA.",
                              hint=INSTALL_CUDA_HINT)
        names = {i.name for i in self.session.get_inputs()}
        self.layout = KVLayout.of(folder)
        missing = [past for past, _ in self.layout.names if past not in names]
        if missing:
            raise ModelFolderError(f"model.onnx lacks {missing[0]} although genai_config.json lists "
                                   f"{folder.num_layers} layers.", hint=REEXPORT_HINT)
        self.vocab = folder.vocab_size
        self.pad = folder.pad_token_id
        self.rope = LongRope(folder.long_context_threshold)
        self.keeps_logits = LOGITS_TO_KEEP in names
        self.chunk = MAX_CHUNK if self.keeps_logits else int(
            np.clip(LOGITS_BUDGET_BYTES // (4 * self.vocab), 64, MAX_CHUNK))
        self.recomputes = 0  # how many times a LongRoPE switch forced a full recompute
        #: the export's switchable LoRA adapters (None: no LoRA inputs); each slot's is `pool.adapter[slot]`
        self.lora: LoraBank | None = None
        if (folder.path / LORA_INDEX).is_file():
            self.lora = LoraBank(folder.path, "cuda" if device.kind == "cuda" else "cpu", device.device_id)

    @property
    def adapters(self) -> tuple[str, ...]:
        """The names of the export's switchable adapters (empty without)."""
        return self.lora.names if self.lora is not None else ()

    def check_adapter(self, name: str | None) -> None:
        """Refuse an adapter this export does not have (OptionsError naming the ones it has)."""
        if name is None:
            return
        if self.lora is None:
            raise OptionsError(f"This model has no adapters, so adapter {name!r} cannot be used.",
                               hint="Export it with --adapter NAME=PATH, or drop the adapter option.")
        self.lora.check(name)
        self.lora.params(name)  # a broken file is refused now, not inside a run

    def pool(self, slots: int, capacity: int, *, prefault: bool = False) -> KVPool:
        """A new KVPool for this model on its device."""
        location = "cuda" if self.device.kind == "cuda" else "cpu"
        return KVPool(self.layout, slots, capacity, location, self.device.device_id if location == "cuda" else 0,
                      prefault=prefault)

    # -- one run ---------------------------------------------------------------------------------
    def run(self, pool: KVPool, lo: int, hi: int, input_ids: np.ndarray, valid: np.ndarray,
            lengths: np.ndarray | None = None) -> np.ndarray:
        """One session run over slots [lo, hi) of `pool`: row b adds `lengths[b]` tokens (default: all
        of its `input_ids` row, right-padded) and holds `valid[b]` afterwards. Returns each row's
        last-new-token logits [rows, vocab]."""
        rows, seq = input_ids.shape
        width = int(valid.max())
        if width > pool.capacity:
            raise RuntimeError(f"a slot of {pool.capacity} tokens cannot hold {width}")  # a bug, not user error
        new = np.full(rows, seq) if lengths is None else lengths
        keep = seq - int(new.min()) + 1 if self.keeps_logits else seq  # from the shortest row's last token on
        binding = pool.binding(self.session, lo, hi)
        mask = (np.arange(width)[None, :] < valid[:, None]).astype(np.int64)
        logits = np.empty((rows, keep, self.vocab), dtype=np.float32)
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, dtype=np.int64))
        binding.bind_cpu_input("attention_mask", mask)
        if self.lora is not None:
            self.lora.bind(binding, pool.adapter[lo:hi])
        if self.keeps_logits:
            binding.bind_cpu_input(LOGITS_TO_KEEP, np.array(keep, dtype=np.int64))
        binding.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        self.session.run_with_iobinding(binding)
        return logits[np.arange(rows), new - 1 - (seq - keep)]

    # -- prefill and decode ----------------------------------------------------------------------
    def prefill(self, pool: KVPool, slot: int, tokens: Sequence[int], limit: int | None = None) -> np.ndarray | None:
        """Run the part of `tokens` that `slot` does not hold yet (it must hold a prefix of them), batch 1:
        at most `limit` tokens (None: all), except that a first chunk from empty crosses the LongRoPE
        switch. Returns the last token's logits [vocab] once all of `tokens` are held, else None."""
        start, total = pool.filled(slot), len(tokens)
        end = total if limit is None else min(total, start + limit)
        if start == 0:
            pool.long[slot] = self.rope.is_long(total)
            end = self.rope.first_chunk_end(total, end)
        logits = None
        ids = np.asarray(tokens, dtype=np.int64)
        try:
            for lo, hi in self.rope.chunks(start, end, self.chunk):
                logits = self.run(pool, slot, slot + 1, ids[None, lo:hi], np.array([hi]))
                pool.held[slot].extend(int(t) for t in ids[lo:hi])
        except BaseException:
            pool.clear(slot)  # an interrupted run may have written part of the row
            raise
        return logits[0] if logits is not None and end == total else None

    def prefill_batch(self, pool: KVPool, slots: Sequence[int], prompts: Sequence[Sequence[int]]) -> np.ndarray:
        """Prefill empty, contiguous `slots` with `prompts` in one right-padded run; last logits [rows, vocab].
        The rows must share a run key (`batchable`)."""
        lo, hi = slots[0], slots[-1] + 1
        if list(slots) != list(range(lo, hi)) or any(pool.filled(s) for s in slots):
            raise ValueError("prefill_batch takes empty, contiguous slots")  # a bug, not user input
        lengths = np.array([len(p) for p in prompts])
        ids = np.full((len(prompts), int(lengths.max())), self.pad, dtype=np.int64)
        for b, prompt in enumerate(prompts):
            ids[b, : len(prompt)] = prompt
        try:
            logits = self.run(pool, lo, hi, ids, lengths, lengths)
        except BaseException:
            for slot in slots:
                pool.clear(slot)
            raise
        for slot, prompt in zip(slots, prompts, strict=True):
            pool.held[slot] = [int(t) for t in prompt]
            pool.long[slot] = self.rope.is_long(int(lengths.max()))
        return logits

    def batchable(self, prompts: Sequence[Sequence[int]]) -> bool:
        """Whether `prompts` may be prefilled together: one run's width (the longest) picks every row's
        rotary factors, so each row's own regime must be the same."""
        return len({self.rope.key(len(p)) for p in prompts}) == 1

    def decode(self, pool: KVPool, tokens: Mapping[int, int]) -> dict[int, np.ndarray]:
        """Add one token to each slot in `tokens` ({slot: token}); returns {slot: logits [vocab]}.

        A slot whose cache must be recomputed (the LongRoPE switch) is run again from empty, alone.
        The others run in as few runs as their run keys allow, each over a contiguous slot range (on CPU
        bridging at most MAX_IDLE_GAP slots that are not decoding). Such an idle slot still writes one throw-away
        entry. On a CPU pool it is *parked*: a one-token mask, so it attends to one entry instead of all it
        holds (a decode row's attention reads its whole cache), and its entry at position 0, which the
        throw-away one overwrites, is copied aside and written back. Elsewhere it writes just past what it
        holds (its own next run overwrites that), so it may sit in a range only if its width keeps the key.
        """
        out: dict[int, np.ndarray] = {}
        rest = []
        for slot in sorted(tokens):
            if self.rope.must_recompute(pool.long[slot], pool.filled(slot) + 1):
                out[slot] = self.recompute(pool, slot, [*pool.held[slot], tokens[slot]])
            else:
                rest.append(slot)
        for run in self._runs(pool, rest):
            lo, hi = run[0], run[-1] + 1
            ids = np.full((hi - lo, 1), self.pad, dtype=np.int64)
            for slot in run:
                ids[slot - lo, 0] = tokens[slot]
            parked = [s for s in range(lo, hi) if s not in run and pool.filled(s)] if pool.parks else []
            valid = np.array([1 if s in parked else pool.filled(s) + 1 for s in range(lo, hi)])
            saved = pool.first_entries(parked)
            try:
                logits = self.run(pool, lo, hi, ids, valid)
            finally:
                pool.put_first_entries(parked, saved)
            for slot in run:
                pool.held[slot].append(int(tokens[slot]))
                out[slot] = logits[slot - lo]
        return out

    def extend(self, pool: KVPool, slot: int, tokens: Sequence[int]) -> np.ndarray:
        """Add several `tokens` to `slot` in one batch-1 run after what it holds (a sampled token and those
        a grammar forces after it); the last one's logits [vocab]. As in `decode`, a slot that crosses the
        LongRoPE switch is recomputed from empty first."""
        sequence = [*pool.held[slot], *tokens]
        if self.rope.must_recompute(pool.long[slot], len(sequence)):
            return self.recompute(pool, slot, sequence)
        logits = self.prefill(pool, slot, sequence)
        assert logits is not None
        return logits

    def _runs(self, pool: KVPool, slots: list[int]) -> list[list[int]]:
        """Group decoding `slots` (sorted) into runs: equal run keys; where the pool parks idle slots (CPU), at
        most MAX_IDLE_GAP of them between two of a run; elsewhere every idle one compatible with that key (its
        throw-away entry widens the mask)."""
        runs: list[list[int]] = []
        for slot in slots:
            key = self.rope.key(pool.filled(slot) + 1)
            if runs and self.rope.key(pool.filled(runs[-1][0]) + 1) == key and \
                    self._bridges(pool, key, runs[-1][-1], slot):
                runs[-1].append(slot)
            else:
                runs.append([slot])
        return runs

    def _bridges(self, pool: KVPool, key: bool, last: int, slot: int) -> bool:
        """Whether a run with run key `key` ending at slot `last` may take in `slot` over the idle slots between."""
        if pool.parks:
            return slot - last - 1 <= MAX_IDLE_GAP
        return all(pool.filled(s) < pool.capacity and (key or not self.rope.key(pool.filled(s) + 1))
                   for s in range(last + 1, slot))

    def recompute(self, pool: KVPool, slot: int, tokens: Sequence[int]) -> np.ndarray:
        """The LongRoPE crossing: run `tokens` again from an empty slot (long factors); last logits [vocab]."""
        self.recomputes += 1
        log.debug("LongRoPE: %d tokens pass the original context %s; recomputing the cache with the long factors",
                  len(tokens), self.rope.threshold)
        pool.clear(slot)
        logits = self.prefill(pool, slot, tokens)
        assert logits is not None
        return logits

    def close(self) -> None:
        """Release the session."""
        self.session = None


def _session(folder: ModelFolder, device: DeviceChoice, threads: int | None) -> Any:
    """The InferenceSession: the in-memory copy with `logits_to_keep` when it loads, else model.onnx."""
    import onnxruntime as ort

    def options() -> Any:
        made = ort.SessionOptions()
        if threads:
            made.intra_op_num_threads = threads
        if (folder.path / LORA_INDEX).is_file():
            # ORT warns once per LoRA input that an initializer which is also an input is not constant-folded:
            # that is the point (they are optional inputs with zero-rank defaults).
            made.log_severity_level = 3
        return made

    try:
        graph = add_logits_to_keep(folder.model_path)
        if (folder.path / LORA_INDEX).is_file():
            graph = require_lora_inputs(graph if graph is not None else folder.model_path)
        if graph is not None:
            rewritten = options()
            # The copy is loaded from memory; its weights stay in the folder's external data.
            rewritten.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                               str(folder.path))
            try:
                return ort.InferenceSession(graph, rewritten, providers=device.ort_providers())
            except Exception as error:  # e.g. an onnxruntime without that config entry
                log.debug("the graph with logits_to_keep did not load (%s); using model.onnx as written", error)
        return ort.InferenceSession(str(folder.model_path), options(), providers=device.ort_providers())
    except Exception as error:  # onnxruntime raises its own Fail/InvalidProtobuf/... types
        raise ModelFolderError(f"ONNX Runtime could not load {folder.model_path}: {error}",
                               hint=REEXPORT_HINT) from error
