"""An exported model folder, checked once: graph, genai_config, tokenizer, and what the loop needs.

genai_config.json is read by onnxruntime-genai too, which trusts it: a wrong size there allocates
terabytes, a name template with `%s` crashes the process, `num_beams` above 1 segfaults. So every field
either backend reads is checked here, by type, by range and against model.onnx where the graph says
(layer count, KV heads, head size, vocabulary, input and output names), before either backend sees it.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from phi_onnx.jsonfile import read_json_object
from phi_onnx.manifest import ManifestError, read_manifest
from phi_onnx.runtime.errors import ModelFolderError
from phi_onnx.runtime.providers import check_threads

# The bounds config.json is held to: far beyond any real model, so only a damaged file reaches them.
from phi_onnx.source.config import _MAX_HEADS, _MAX_LAYERS, _MAX_POSITIONS, _MAX_VOCAB, _MAX_WIDTH

log = logging.getLogger(__name__)

EXPORT_HINT = "Create one with `phi-onnx export SOURCE -o FOLDER` (or pass the folder an export wrote)."
REEXPORT_HINT = "The export is incomplete or damaged; run `phi-onnx export` again with --overwrite."
FIELD_HINT = ("Set it to the value the export wrote (the model's config.json has the sizes), or export again "
              "with --overwrite.")
#: genai_config.json's model.type values phi-onnx writes (one per builder), all decoder-only graphs with
#: the inputs the runtime feeds; onnxruntime-genai builds other pipelines for other types.
GENAI_TYPES = ("decoder", "phi", "phi3", "phi3small", "phimoe")
#: A past/present name template: one %d for the layer and no other conversion (onnxruntime-genai
#: formats it with printf, so a stray %s reads memory it does not own).
_LAYER_TEMPLATE = re.compile(r"[^%]*%d[^%]*")


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


def read_folder(path: str | os.PathLike[str]) -> ModelFolder:
    """Check `path` is an export and read its settings; raises ModelFolderError naming what is wrong.

    The path itself is checked first (too long, a symlink loop, no permission, a file, a NUL byte...),
    and any OSError while reading the folder becomes a ModelFolderError naming the file.
    """
    folder = _folder_path(path)
    try:
        return _read_folder(folder)
    except OSError as error:
        raise _unreadable(folder, error) from error


def shown_path(path: str | os.PathLike[str]) -> str:
    """`path` for a message: long ones shortened, unprintable characters (escape sequences, NUL,
    surrogates) escaped, so an error about a hostile path is still one readable line."""
    text = os.fspath(path) if not isinstance(path, bytes) else repr(path)
    if len(text) > 200:
        text = f"{text[:120]}...{text[-60:]} ({len(text)} characters)"
    return text if text.isprintable() else ascii(text)


def _folder_path(path: str | os.PathLike[str]) -> Path:
    """`path` as a Path to an existing folder, or ModelFolderError saying why it cannot be one."""
    try:
        folder = Path(path).expanduser()
    except RuntimeError as error:  # "~nosuchuser/x": no such user (or no home directory)
        raise ModelFolderError(f"{shown_path(path)} starts with a ~ that names no home folder ({error}).",
                               hint="Use the folder's full path.") from error
    try:
        info = folder.stat()
    except ValueError as error:  # a NUL byte, or a surrogate the file system encoding cannot write
        raise ModelFolderError(f"{shown_path(folder)} is not a usable path ({error}).",
                               hint="Pass the export folder's real path.") from error
    except OSError as error:
        raise _unreadable(folder, error) from error
    if not stat.S_ISDIR(info.st_mode):
        raise ModelFolderError(f"{shown_path(folder)} is not a folder.", hint=EXPORT_HINT)
    return folder


def _unreadable(folder: Path, error: OSError) -> ModelFolderError:
    """The ModelFolderError for an OSError met while opening `folder` or reading a file in it."""
    name = shown_path(error.filename if isinstance(error.filename, str) else folder)
    code = error.errno
    the_folder = not isinstance(error.filename, str) or Path(error.filename) == folder
    if code == errno.ENOENT and the_folder:
        return ModelFolderError(f"{name} is not a folder: nothing is there.", hint=EXPORT_HINT)
    if code == errno.ENOTDIR and the_folder:
        return ModelFolderError(f"{name} is not a folder: a part of that path is a file.", hint=EXPORT_HINT)
    if code == errno.ENAMETOOLONG:
        text = error.filename if isinstance(error.filename, str) else str(folder)
        longest = max((len(os.fsencode(part)) for part in Path(text).parts), default=0)
        return ModelFolderError(
            f"{name} is too long for this system: the path is {len(os.fsencode(text))} bytes and its longest "
            f"name {longest} (the limits here are {_path_limit('PC_PATH_MAX', 4096)} bytes for a path and "
            f"{_path_limit('PC_NAME_MAX', 255)} for a name).",
            hint="Use a shorter path: move or rename the folder, or link it from a short name (ln -s).")
    if code == errno.ELOOP:
        return ModelFolderError(f"{name} cannot be opened: its symbolic links form a loop.",
                                hint="Fix or remove the link (`ls -l` shows where it points).")
    if code in (errno.EACCES, errno.EPERM):
        return ModelFolderError(f"Permission denied reading {name}.",
                                hint="Give your user read access to the export's files (and access to the "
                                     "folders above it), or copy the export somewhere you can read.")
    return ModelFolderError(f"{name} cannot be read: {error.strerror or error}.",
                            hint="Check the disk and the path, or export again with --overwrite.")


def _path_limit(name: str, default: int) -> int:
    try:
        return int(os.pathconf("/", name))
    except (OSError, ValueError, AttributeError):
        return default


def _read_folder(folder: Path) -> ModelFolder:
    missing = [name for name in ("model.onnx", "genai_config.json") if not (folder / name).is_file()]
    if missing:
        raise ModelFolderError(f"{shown_path(folder)} is not a phi-onnx export: {' and '.join(missing)} missing.",
                               hint=EXPORT_HINT)
    if not (folder / "tokenizer.json").is_file():
        raise ModelFolderError(
            f"{shown_path(folder)} has no tokenizer.json, so text cannot be encoded.",
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
    fields = GenaiFields(folder / "genai_config.json", genai)
    model, facts = _check_genai_config(fields, graph)
    vocab = facts["vocab_size"]
    eos = (_token_ids(fields, model, "eos_token_id", "model.eos_token_id", vocab)
           + _token_ids(GenaiFields(folder / "generation_config.json", generation), generation, "eos_token_id",
                        "eos_token_id", vocab))
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
    bos = _token_ids(fields, model, "bos_token_id", "model.bos_token_id", vocab, single=True)
    pad = _token_ids(fields, model, "pad_token_id", "model.pad_token_id", vocab, single=True) or eos[:1]
    return ModelFolder(
        path=folder, genai_config=genai, eos_token_ids=tuple(dict.fromkeys(eos)),
        bos_token_id=bos[0] if bos else None, pad_token_id=pad[0],
        long_context_threshold=graph["threshold"], export_device=export_device, kv_dtype=graph["kv_dtype"],
        weight_bytes=sum(p.stat().st_size for p in folder.glob("model.onnx*") if p.is_file()),
        embedding_bytes=graph["embedding_bytes"],
        manifest=manifest, **facts)


class GenaiFields:
    """Reads fields of a JSON config with their types and ranges checked; errors name the file and key."""

    def __init__(self, path: Path, data: dict[str, Any]) -> None:
        self.path = path
        self.data = data

    def fail(self, key: str, value: Any, rule: str, hint: str = FIELD_HINT) -> ModelFolderError:
        """The error for `key` holding `value`, which breaks `rule` ("it must be ...")."""
        return ModelFolderError(f"{shown_path(self.path)}: {key} is {_short(value)}; {rule}.", hint=hint)

    def section(self, parent: dict[str, Any], name: str, key: str, *, required: bool = True) -> dict[str, Any]:
        """The object `parent[name]` ({} when absent and not `required`)."""
        if name not in parent and not required:
            return {}
        if name not in parent:
            raise ModelFolderError(f"{shown_path(self.path)} lacks the required \"{key}\" section.",
                                   hint=REEXPORT_HINT)
        value = parent[name]
        if not isinstance(value, dict):
            raise self.fail(key, value, "it must be a JSON object", REEXPORT_HINT)
        return value

    def whole(self, section: dict[str, Any], name: str, key: str, low: int, high: int, *,
              default: int | None = None, high_is: str = "") -> int:
        """A whole number in [low, high] (4096.0 counts as 4096, as in config.json); `default` when absent,
        which is an error when there is no default. `high_is` names where the upper bound comes from."""
        if name not in section:
            if default is None:
                raise ModelFolderError(f"{shown_path(self.path)} lacks the required field {key}.",
                                       hint=FIELD_HINT)
            return default
        value = section[name]
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            bound = f"{high} ({high_is})" if high_is else str(high)
            rule = f"it must be {low}" if low == high else f"it must be a positive whole number, at most {bound}" \
                if low == 1 else f"it must be a whole number from {low} to {bound}"
            raise self.fail(key, section[name], rule)
        return value

    def number(self, section: dict[str, Any], name: str, key: str, low: float = -math.inf,
               high: float = math.inf) -> None:
        """A finite number in [low, high], when present (onnxruntime-genai refuses NaN and infinities)."""
        if name in section:
            value = section[name]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not low <= value <= high:
                bounds = "" if (low, high) == (-math.inf, math.inf) else \
                    f" from {low:g}" + (f" to {high:g}" if high != math.inf else " up")
                raise self.fail(key, value, f"it must be a finite number{bounds}")

    def flag(self, section: dict[str, Any], name: str, key: str) -> None:
        """true or false, when present."""
        if name in section and not isinstance(section[name], bool):
            raise self.fail(key, section[name], "it must be true or false")

    def text(self, section: dict[str, Any], name: str, key: str) -> str | None:
        """A string, when present."""
        if name not in section:
            return None
        if not isinstance(section[name], str):
            raise self.fail(key, section[name], "it must be a string")
        return str(section[name])


def _check_genai_config(fields: GenaiFields, graph: dict[str, Any]) -> tuple[dict[str, Any], dict[str, int]]:
    """Check every field of genai_config.json either backend reads; returns its "model" section and the
    sizes ModelFolder keeps. Sizes must match model.onnx wherever the graph fixes them."""
    model = fields.section(fields.data, "model", "model")
    decoder = fields.section(model, "decoder", "model.decoder")
    context = fields.whole(model, "context_length", "model.context_length", 1, _MAX_POSITIONS)
    vocab = fields.whole(model, "vocab_size", "model.vocab_size", 1, _MAX_VOCAB)
    layers = fields.whole(decoder, "num_hidden_layers", "model.decoder.num_hidden_layers", 1, _MAX_LAYERS)
    kv_heads = fields.whole(decoder, "num_key_value_heads", "model.decoder.num_key_value_heads", 1, _MAX_HEADS)
    heads = fields.whole(decoder, "num_attention_heads", "model.decoder.num_attention_heads", 1, _MAX_HEADS)
    head_size = fields.whole(decoder, "head_size", "model.decoder.head_size", 1, _MAX_WIDTH)
    fields.whole(decoder, "hidden_size", "model.decoder.hidden_size", 1, _MAX_WIDTH)
    if heads % kv_heads:
        raise fields.fail("model.decoder.num_attention_heads", heads,
                          f"it must be a multiple of model.decoder.num_key_value_heads ({kv_heads})")
    if kv_heads * head_size > _MAX_WIDTH or heads * head_size > _MAX_WIDTH:
        raise fields.fail("model.decoder.head_size", head_size,
                          f"with {heads} heads ({kv_heads} for keys and values) that is wider than any model "
                          f"(at most {_MAX_WIDTH} per token)")
    # The graph fixes these: a different number would make either backend feed tensors model.onnx refuses,
    # or allocate a KV cache for a model that does not exist.
    for key, value, actual in (("model.decoder.num_hidden_layers", layers, graph["layers"]),
                               ("model.decoder.num_key_value_heads", kv_heads, graph["kv_heads"]),
                               ("model.decoder.head_size", head_size, graph["head_size"]),
                               ("model.vocab_size", vocab, graph["vocab"])):
        if actual is not None and value != actual:
            raise fields.fail(key, value, f"model.onnx has {actual}, so it must be {actual}",
                              f"Set it to {actual}, or export again with --overwrite.")
    model_type = fields.text(model, "type", "model.type")
    if model_type is None or model_type not in GENAI_TYPES:
        raise fields.fail("model.type", model.get("type"), f"it must be one of {', '.join(GENAI_TYPES)}",
                          "Set it to the type the export wrote (phi3 for Phi-3 and Phi-4, phi for Phi-2), "
                          "or export again with --overwrite.")
    filename = fields.text(decoder, "filename", "model.decoder.filename")
    if filename is not None and filename != "model.onnx":
        raise fields.fail("model.decoder.filename", filename, "phi-onnx runs model.onnx, so it must be \"model.onnx\"",
                          'Set it to "model.onnx".')
    _check_names(fields, decoder, graph, layers)
    _check_session_options(fields, decoder)
    search = fields.section(fields.data, "search", "search", required=False)
    max_length = fields.whole(search, "max_length", "search.max_length", 1, context, default=context,
                              high_is="model.context_length")
    fields.whole(search, "min_length", "search.min_length", 0, max_length, default=0, high_is="search.max_length")
    fields.whole(search, "no_repeat_ngram_size", "search.no_repeat_ngram_size", 0, max_length, default=0,
                 high_is="search.max_length")
    fields.whole(search, "top_k", "search.top_k", 0, _MAX_VOCAB, default=0)
    fields.whole(search, "batch_size", "search.batch_size", 1, _MAX_HEADS, default=1)
    fields.whole(search, "random_seed", "search.random_seed", -1, 2**31 - 1, default=-1)
    for name in ("num_beams", "num_return_sequences"):
        # phi-onnx picks each token itself, one sequence per prompt; onnxruntime-genai's beam search
        # driven that way crashes the process.
        fields.whole(search, name, f"search.{name}", 1, 1, default=1)  # "it must be 1"
    for name in ("do_sample", "early_stopping", "past_present_share_buffer"):
        fields.flag(search, name, f"search.{name}")
    fields.number(search, "temperature", "search.temperature", 0.0)
    fields.number(search, "top_p", "search.top_p", 0.0, 1.0)
    fields.number(search, "repetition_penalty", "search.repetition_penalty", 0.0)
    fields.number(search, "diversity_penalty", "search.diversity_penalty", 0.0)
    fields.number(search, "length_penalty", "search.length_penalty")
    facts = {"context_length": context, "default_max_length": max_length, "vocab_size": vocab, "num_layers": layers,
             "num_kv_heads": kv_heads, "head_size": head_size}
    return model, facts


def _check_names(fields: GenaiFields, decoder: dict[str, Any], graph: dict[str, Any], layers: int) -> None:
    """decoder.inputs/outputs: each name is one model.onnx has; each per-layer template has a single %d
    and names every layer's tensor."""
    for section_name, have in (("inputs", graph["inputs"]), ("outputs", graph["outputs"])):
        key = f"model.decoder.{section_name}"
        section = fields.section(decoder, section_name, key, required=False)
        for name, value in section.items():
            if not isinstance(value, str):
                raise fields.fail(f"{key}.{name}", value, "it must be a string naming a graph " + section_name[:-1])
            if name.endswith("_names"):
                if not _LAYER_TEMPLATE.fullmatch(value):
                    raise fields.fail(f"{key}.{name}", value, "it must hold one %d (the layer) and no other %",
                                      'Use the name the export wrote, e.g. "past_key_values.%d.key".')
                wanted = [value.replace("%d", str(i)) for i in range(layers)]
            else:
                wanted = [value]
            absent = next((w for w in wanted if w not in have), None)
            if absent is not None:
                raise fields.fail(f"{key}.{name}", value, f"model.onnx has no {section_name[:-1]} {_short(absent)}",
                                  "Use the name the export wrote (see model.onnx's inputs and outputs), or remove it.")


def _check_session_options(fields: GenaiFields, decoder: dict[str, Any]) -> None:
    """model.decoder.session_options, as onnxruntime-genai reads them (types) and as this machine runs them."""
    key = "model.decoder.session_options"
    session = fields.section(decoder, "session_options", key, required=False)
    for name in ("intra_op_num_threads", "inter_op_num_threads"):
        if name in session:
            value = session[name]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise fields.fail(f"{key}.{name}", value, "it must be a whole number >= 0",
                                  f'Use e.g. "{name}": 0 (ONNX Runtime picks one thread per core), or remove it.')
            check_threads(value, f"{shown_path(fields.path)}: {key}.{name}", ModelFolderError)
    fields.text(session, "log_id", f"{key}.log_id")
    providers = session.get("provider_options", [])
    if not isinstance(providers, list) or not all(
            isinstance(entry, dict) and all(isinstance(options, dict) and all(
                isinstance(v, str) for v in options.values()) for options in entry.values()) for entry in providers):
        raise fields.fail(f"{key}.provider_options", providers,
                          'it must be a list like [{"cuda": {"enable_cuda_graph": "0"}}] (option values are strings)',
                          REEXPORT_HINT)


def _token_ids(fields: GenaiFields, section: dict[str, Any], name: str, key: str, vocab: int, *,
               single: bool = False) -> list[int]:
    """A token id field (absent, one id, or a list unless `single`) as a list; every id in 0..vocab-1."""
    if name not in section:
        return []
    value = section[name]
    values = value if isinstance(value, list) and not single else [value]
    for item in values:
        if isinstance(item, bool) or not isinstance(item, int) or not 0 <= item < vocab:
            what = "a token id" if single else "a token id or a list of them"
            raise fields.fail(key, value, f"it must be {what}, from 0 to {vocab - 1} (the vocabulary)",
                              f"Set it to the model's {name.replace('_token_id', '')} token id(s) (tokenizer.json "
                              "and config.json name them), or export again with --overwrite.")
    return list(values)


def _short(value: Any) -> str:
    """`value` for a message: at most 80 characters of its repr."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


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
    layers = sum(1 for name in inputs if re.fullmatch(r"past_key_values\.\d+\.key", name))
    logits = next(o for o in graph.output if o.name == "logits")
    return {"kv_dtype": kv_dtype, "threshold": _long_rope_threshold(graph),
            "embedding_bytes": _gathered_only_bytes(graph), "inputs": set(inputs),
            "outputs": {o.name for o in graph.output}, "layers": layers,
            "kv_heads": _static_dim(kv, 1), "head_size": _static_dim(kv, 3), "vocab": _static_dim(logits, 2)}


def _static_dim(value: Any, axis: int) -> int | None:
    """The size of a graph input/output's `axis` when the graph fixes it (None when symbolic or absent)."""
    dims = value.type.tensor_type.shape.dim
    return int(dims[axis].dim_value) if len(dims) > axis and dims[axis].HasField("dim_value") else None


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
