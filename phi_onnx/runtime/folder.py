"""An exported model folder, checked once: graph, genai_config, tokenizer, and what the loop needs."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from phi_onnx.jsonfile import read_json_object
from phi_onnx.manifest import ManifestError, read_manifest
from phi_onnx.runtime.errors import ModelFolderError
from phi_onnx.source.config import token_ids

log = logging.getLogger(__name__)

EXPORT_HINT = "Create one with `phi-onnx export SOURCE -o FOLDER` (or pass the folder an export wrote)."
REEXPORT_HINT = "The export is incomplete or damaged; run `phi-onnx export` again with --overwrite."


@dataclass(frozen=True)
class ModelFolder:
    """What the runtime reads from an export folder.

    Attributes:
        path: the folder.
        context_length: the model's context (max positions), from genai_config.
        eos_token_ids: every id that ends a reply (genai_config and generation_config.json).
        long_context_threshold: for LongRoPE graphs, the original context: the graph switches to the
            long factors once the attention mask is wider than this (None for plain rotary).
        export_device: "cpu" or "cuda", the provider the graph was built for.
        kv_dtype: the KV cache element type of the graph (float32 on CPU exports, float16 on CUDA).
        weight_bytes: size of model.onnx plus its external data.
        embedding_bytes: weights only gathered from (the embedding table): a decode step reads one
            row of them, so `weight_bytes - embedding_bytes` is about what each step reads.
    """

    path: Path
    genai_config: dict[str, Any] = field(repr=False)
    context_length: int
    default_max_length: int
    vocab_size: int
    num_layers: int
    num_kv_heads: int
    head_size: int
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    pad_token_id: int
    long_context_threshold: int | None
    export_device: str
    kv_dtype: np.dtype = field(repr=False)
    weight_bytes: int = 0
    embedding_bytes: int = 0
    manifest: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def model_path(self) -> Path:
        """model.onnx."""
        return self.path / "model.onnx"


def read_folder(path: str | Path) -> ModelFolder:
    """Check `path` is an export and read its settings; raises ModelFolderError naming what is wrong."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ModelFolderError(f"{folder} is not a folder.", hint=EXPORT_HINT)
    missing = [name for name in ("model.onnx", "genai_config.json") if not (folder / name).is_file()]
    if missing:
        raise ModelFolderError(f"{folder} is not a phi-onnx export: {' and '.join(missing)} missing.",
                               hint=EXPORT_HINT)
    if not (folder / "tokenizer.json").is_file():
        raise ModelFolderError(
            f"{folder} has no tokenizer.json, so text cannot be encoded.",
            hint="Copy tokenizer.json and tokenizer_config.json from the source checkpoint into the folder, "
                 "or export again from a checkpoint that has them.")
    genai = _read_json(folder / "genai_config.json")
    try:
        manifest = read_manifest(folder)
    except ManifestError as error:
        raise ModelFolderError(error.message, hint=error.hint) from error
    generation = (_read_json(folder / "generation_config.json")
                  if (folder / "generation_config.json").is_file() else {})
    graph = _graph_facts(folder)
    try:
        model = genai["model"]
        decoder = model["decoder"]
        context = int(model["context_length"])
        eos = token_ids(model.get("eos_token_id")) + token_ids(generation.get("eos_token_id"))
        facts = {
            "context_length": context,
            "default_max_length": int(genai.get("search", {}).get("max_length") or context),
            "vocab_size": int(model["vocab_size"]),
            "num_layers": int(decoder["num_hidden_layers"]),
            "num_kv_heads": int(decoder["num_key_value_heads"]),
            "head_size": int(decoder["head_size"]),
        }
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        raise ModelFolderError(f"{folder / 'genai_config.json'} lacks a required field ({error}).",
                               hint=REEXPORT_HINT) from error
    _check_genai_fields(folder / "genai_config.json", facts, decoder)
    if not eos:
        raise ModelFolderError("Neither genai_config.json nor generation_config.json names an EOS token.",
                               hint="Add \"eos_token_id\" to genai_config.json's \"model\" section.")
    export_device = "cuda" if graph["kv_dtype"] == np.float16 else "cpu"
    if manifest is not None and "options" in manifest:
        if not isinstance(manifest["options"], dict):
            raise ModelFolderError(
                f"{folder / 'phi_onnx.json'}: \"options\" is {type(manifest['options']).__name__}, not an object.",
                hint=f'Restore it to the object the export wrote (e.g. {{"device": "{export_device}", ...}}), '
                     "or export again with --overwrite.")
        export_device = str(manifest["options"].get("device", export_device))
    bos = token_ids(model.get("bos_token_id"))
    pad = token_ids(model.get("pad_token_id")) or eos[:1]
    return ModelFolder(
        path=folder, genai_config=genai, eos_token_ids=tuple(dict.fromkeys(eos)),
        bos_token_id=bos[0] if bos else None, pad_token_id=pad[0],
        long_context_threshold=graph["threshold"], export_device=export_device, kv_dtype=graph["kv_dtype"],
        weight_bytes=sum(p.stat().st_size for p in folder.glob("model.onnx*") if p.is_file()),
        embedding_bytes=graph["embedding_bytes"],
        manifest=manifest, **facts)


def _check_genai_fields(path: Path, facts: dict[str, int], decoder: dict[str, Any]) -> None:
    """Refuse sizes that cannot be right and session options ONNX Runtime would choke on later."""
    for name in ("context_length", "vocab_size", "num_layers", "num_kv_heads", "head_size"):
        if facts[name] < 1:
            key = {"num_layers": "decoder.num_hidden_layers", "num_kv_heads": "decoder.num_key_value_heads",
                   "head_size": "decoder.head_size"}.get(name, name)
            raise ModelFolderError(f"{path}: model.{key} is {facts[name]}; it must be a positive integer.",
                                   hint="Set it to the model's value (from its config.json), or export again "
                                        "with --overwrite.")
    if facts["default_max_length"] < 1:
        raise ModelFolderError(f"{path}: search.max_length is {facts['default_max_length']}; it must be positive.",
                               hint="Remove it (the context length is used) or set a positive token count.")
    session = decoder.get("session_options", {})
    if not isinstance(session, dict):
        raise ModelFolderError(f"{path}: model.decoder.session_options is not an object.", hint=REEXPORT_HINT)
    for key in ("intra_op_num_threads", "inter_op_num_threads"):
        value = session.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ModelFolderError(
                f"{path}: model.decoder.session_options.{key} is {value!r}; it must be a whole number >= 0.",
                hint=f'Use e.g. "{key}": 0 (ONNX Runtime picks one thread per core), or remove it.')


def check_vocabulary(folder: ModelFolder, tokenizer_vocab: int) -> None:
    """Refuse a genai_config whose vocab_size is smaller than the tokenizer's: its ids would overflow the logits."""
    if tokenizer_vocab > folder.vocab_size:
        raise ModelFolderError(
            f"{folder.path / 'genai_config.json'}: model.vocab_size is {folder.vocab_size}, but tokenizer.json "
            f"has {tokenizer_vocab} tokens.",
            hint="Set model.vocab_size to the model's vocabulary (its logits width, config.json's vocab_size), "
                 "or export again with --overwrite.")


def _read_json(path: Path) -> dict[str, Any]:
    return read_json_object(path, ModelFolderError, REEXPORT_HINT)


def _graph_facts(folder: Path) -> dict[str, Any]:
    """Read model.onnx's structure (not its weights): KV dtype and the LongRoPE switch point.

    The switch point is read from the graph rather than the source config.json because the graph
    is what decides (and the source checkpoint may be gone): the exporter compares the attention
    mask width against a constant in `/model/rotary_emb/Greater`.
    """
    import onnx
    from google.protobuf.message import DecodeError

    path = folder / "model.onnx"
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, OSError, ValueError, RuntimeError) as error:
        raise ModelFolderError(f"{path} is not a valid ONNX model ({error}).", hint=REEXPORT_HINT) from error
    graph = model.graph
    inputs = {i.name: i for i in graph.input}
    if "input_ids" not in inputs or "attention_mask" not in inputs or "logits" not in {o.name for o in graph.output}:
        raise ModelFolderError(f"{path} does not have the decoder inputs/outputs phi-onnx writes "
                               "(input_ids, attention_mask, past_key_values.N.*, logits).", hint=EXPORT_HINT)
    kv = next((i for name, i in inputs.items() if name.startswith("past_key_values.")), None)
    if kv is None:
        raise ModelFolderError(f"{path} has no past_key_values inputs (no KV cache).", hint=EXPORT_HINT)
    elem = kv.type.tensor_type.elem_type
    kv_dtype = np.dtype(np.float16) if elem == onnx.TensorProto.FLOAT16 else np.dtype(np.float32)
    missing_data = {entry.value for init in graph.initializer if init.data_location == onnx.TensorProto.EXTERNAL
                    for entry in init.external_data if entry.key == "location"}
    for name in sorted(missing_data):
        if not (folder / name).is_file():
            raise ModelFolderError(f"{path} keeps its weights in {name}, which is missing.", hint=REEXPORT_HINT)
    return {"kv_dtype": kv_dtype, "threshold": _long_rope_threshold(graph),
            "embedding_bytes": _gathered_only_bytes(graph)}


def _gathered_only_bytes(graph: Any) -> int:
    """Bytes of the initializers that only Gather nodes read (embedding tables)."""
    from onnx import helper

    consumers: dict[str, set[str]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, set()).add(node.op_type)
    total = 0
    for init in graph.initializer:
        if consumers.get(init.name) == {"Gather"} and len(init.dims) == 2:
            try:
                itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(init.data_type)).itemsize
            except (KeyError, TypeError, ValueError):
                continue
            total += int(np.prod(init.dims)) * itemsize
    return total


def _long_rope_threshold(graph: Any) -> int | None:
    from onnx import numpy_helper

    node = next((n for n in graph.node if n.op_type == "Greater" and n.name.startswith("/model/rotary_emb/")),
                None)
    if node is None:
        return None
    constants = {init.name: init for init in graph.initializer}
    constants.update({n.output[0]: n.attribute[0].t for n in graph.node
                      if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"})
    tensor = constants.get(node.input[1])
    if tensor is None:
        log.warning("The LongRoPE switch in model.onnx compares against a non-constant; assuming none")
        return None
    return int(numpy_helper.to_array(tensor).reshape(-1)[0])
