"""PEFT LoRA adapters: `adapter_config.json` + `adapter_model.safetensors`, read without torch or pickles.

An adapter maps base weights (`model.layers.0.self_attn.qkv_proj.weight`, [out, in]) to a LoRA pair
A [r, in], B [out, r] and a scale (`lora_alpha / r`, or `lora_alpha / sqrt(r)` with rslora); the
weight the fine-tune computes with is `W + scale * B @ A`. The tensors are read through the same
streaming, validating safetensors reader as checkpoints (`phi_onnx.source.checkpoint`).

Only plain LoRA on linear layers is read; DoRA, IA3, prompt tuning and the other PEFT methods are
refused by name, as are LoRA on embeddings and `modules_to_save` (whole replaced modules).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from phi_onnx.errors import PhiOnnxError
from phi_onnx.jsonfile import read_json_object
from phi_onnx.paths import expand_user
from phi_onnx.source.checkpoint import Checkpoint, TensorInfo, _read_header, _regular, file_sha256, read_tensor

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
#: PEFT keys start with this (the PeftModel wraps the transformers model as `base_model.model`).
_PREFIX = "base_model.model."
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<side>[AB])(?:\.(?P<name>[^.]+))?\.weight$")
_LAYER = re.compile(r"\.(?:layers|h|blocks)\.(\d+)\.")
_HINT = ("phi-onnx reads PEFT LoRA adapters (adapter_config.json and adapter_model.safetensors) saved by "
         "save_pretrained.")


class AdapterError(PhiOnnxError):
    """A LoRA adapter cannot be read, is of an unsupported kind, or does not fit the base model."""


@dataclass(frozen=True)
class LoraModule:
    """One adapted linear layer: its base weight's name and the A/B tensors in the adapter file."""

    weight: str  # the base checkpoint's tensor, e.g. model.layers.0.self_attn.qkv_proj.weight
    a: TensorInfo  # [r, in]
    b: TensorInfo  # [out, r]
    scale: float
    keys: tuple[str, str] = ("", "")  # the A and B tensor names in the adapter file

    def key(self, info: TensorInfo) -> str:
        """The adapter file's name for `info` (this module's A or B)."""
        return self.keys[0] if info is self.a else self.keys[1]

    @property
    def rank(self) -> int:
        """The LoRA rank r."""
        return self.a.shape[0]


@dataclass
class LoraAdapter:
    """A PEFT LoRA adapter, its tensors read lazily.

    Attributes:
        path: the adapter folder.
        modules: adapted layers by base weight name.
        config: adapter_config.json as read.
    """

    path: Path
    modules: dict[str, LoraModule]
    config: dict[str, Any] = field(repr=False)

    def factors(self, weight: str) -> tuple[np.ndarray, np.ndarray]:
        """(A [r, in], scale * B [out, r]) in float32 for base weight `weight`."""
        module = self.modules[weight]
        return _read(module.a, weight), (_read(module.b, weight) * np.float32(module.scale)).astype(np.float32)

    def delta(self, weight: str) -> np.ndarray:
        """`scale * B @ A` [out, in] in float32, the change the adapter makes to `weight`."""
        a, b = self.factors(weight)
        return b @ a

    def sha256(self) -> str:
        """The adapter weights file's sha256 (for the manifest)."""
        return file_sha256(self.path / WEIGHTS)

    def check_base(self, base: Checkpoint) -> None:
        """Refuse an adapter whose layers the base checkpoint lacks or whose shapes do not match it.

        Raises:
            AdapterError: naming the first adapter tensor that does not fit.
        """
        # Not `base.info`: that would count the adapted tensors as read by the graph (see `check_applied`).
        shapes = base.shapes()
        self.check_shapes({name: shapes[name] for name in self.modules if name in shapes})

    def check_shapes(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Refuse an adapter that adapts a weight missing from `shapes` ({base weight: [out, in]}) or that
        does not fit its shape.

        Raises:
            AdapterError: naming the first adapter tensor that does not fit.
        """
        for weight, module in self.modules.items():
            if weight not in shapes:
                raise AdapterError(f"{self.path}: the adapter adapts {weight!r}, which the base model does not have.",
                                   hint="The adapter was trained on another model; pass the base it was made for.")
            shape = tuple(shapes[weight])
            out, inp = module.b.shape[0], module.a.shape[1]
            if shape != (out, inp):
                bad = module.a if module.a.shape[1] != (shape[-1] if shape else -1) else module.b
                raise AdapterError(
                    f"{self.path}: adapter tensor {module.key(bad)!r} has shape {list(bad.shape)}: it makes a "
                    f"[{out}, {inp}] update for {weight!r}, whose shape is {list(shape)}.",
                    hint="The adapter was trained on another model (or another size of it); pass the base it "
                         "was made for.")


def read_adapter(path: str | os.PathLike[str]) -> LoraAdapter:
    """Read and check a PEFT LoRA adapter folder (config and tensor headers; the tensors stay on disk).

    Raises:
        AdapterError: a missing or unreadable file, an unsupported PEFT type or setting (named), tensors
            that do not pair up or do not match the config.
    """
    folder = expand_user(path, what="The adapter folder", error=AdapterError)
    if not folder.is_dir():
        raise AdapterError(f"The adapter folder {folder} does not exist." if not folder.exists() else
                           f"{folder} is not a folder.", hint=_HINT)
    config_path, weights_path = folder / CONFIG, folder / WEIGHTS
    if not config_path.is_file():
        raise AdapterError(f"{folder} has no {CONFIG}.", hint=_HINT)
    if not _regular(weights_path).is_file():
        pickled = folder / "adapter_model.bin"
        raise AdapterError(
            f"{folder} has no {WEIGHTS}." + (" Its adapter_model.bin is a pickle, which phi-onnx never loads: "
                                             "unpickling can run arbitrary code." if pickled.exists() else ""),
            hint="Save the adapter with `model.save_pretrained(folder, safe_serialization=True)`.")
    config = read_json_object(config_path, AdapterError, _HINT)
    _check_config(config_path, config)
    try:
        tensors = _read_header(weights_path)
    except PhiOnnxError as error:
        raise AdapterError(error.message, hint=error.hint) from None
    return LoraAdapter(folder, _modules(weights_path, config, tensors), config)


def _check_config(path: Path, config: dict[str, Any]) -> None:
    kind = config.get("peft_type")
    if kind != "LORA":
        raise AdapterError(f"{path}: PEFT type {kind!r} is not supported; phi-onnx reads LoRA adapters only.",
                           hint="Train a LoRA adapter (peft.LoraConfig), or merge this one in PyTorch and export "
                                "the merged checkpoint.")
    refused = {
        "use_dora": "DoRA (use_dora=true)", "use_qalora": "QALoRA (use_qalora=true)",
        "modules_to_save": "modules_to_save (whole replaced modules)", "trainable_token_indices": "trainable tokens",
        "layer_replication": "layer_replication", "megatron_config": "Megatron layers", "lora_bias": "lora_bias",
        "alora_invocation_tokens": "aLoRA", "target_parameters": "LoRA on parameters (target_parameters)",
        "use_bdlora": "BD-LoRA", "arrow_config": "Arrow routing", "kasa_config": "KaSA", "velora_config": "VeLoRA",
        "monteclora_config": "MonteCLoRA",
    }
    for key, what in refused.items():
        if config.get(key):
            raise AdapterError(f"{path}: {what} is not supported.",
                               hint="Use a plain LoRA adapter, or merge this one in PyTorch and export the merged "
                                    "checkpoint.")
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
            raise AdapterError(f"{path}: {key} is {value!r}, not a positive number.", hint=_HINT)
    if config.get("fan_in_fan_out"):
        raise AdapterError(f"{path}: fan_in_fan_out=true (Conv1D layers) is not supported by Phi models.", hint=_HINT)


def _modules(file: Path, config: dict[str, Any], tensors: dict[str, TensorInfo]) -> dict[str, LoraModule]:
    pairs: dict[str, dict[str, TensorInfo]] = {}
    names: dict[str, dict[str, str]] = {}
    for key, info in tensors.items():
        if "lora_embedding" in key or "lora_magnitude" in key:
            raise AdapterError(f"{file}: tensor {key!r} is not supported (LoRA on embeddings, or DoRA).",
                               hint="phi-onnx applies LoRA to linear layers only.")
        match = _KEY.match(key)
        if match is None:
            raise AdapterError(f"{file}: tensor {key!r} is not a LoRA A/B weight.",
                               hint="phi-onnx applies plain LoRA to linear layers only.")
        if info.dtype_name not in ("F32", "F16", "BF16", "F64"):
            raise AdapterError(f"{file}: tensor {key!r} is stored as {info.dtype_name}.",
                               hint="Save the adapter in float32, float16 or bfloat16.")
        module = match["module"].removeprefix(_PREFIX)
        pairs.setdefault(module, {})[match["side"]] = info
        names.setdefault(module, {})[match["side"]] = key
    if not pairs:
        raise AdapterError(f"{file} holds no LoRA tensors.", hint=_HINT)
    targets, layers = config.get("target_modules"), config.get("layers_to_transform")
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    modules = {}
    for module, sides in sorted(pairs.items()):
        if set(sides) != {"A", "B"}:
            missing = "lora_B" if "A" in sides else "lora_A"
            raise AdapterError(f"{file}: {module} has no {missing} tensor.", hint="The adapter file is incomplete.")
        a, b = sides["A"], sides["B"]
        if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1] or a.shape[0] == 0:
            raise AdapterError(f"{file}: {module}'s lora_A {list(a.shape)} and lora_B {list(b.shape)} do not pair "
                               "up as [r, in] and [out, r].", hint="The adapter file is corrupt.")
        if targets is not None and not _targeted(module, targets):
            raise AdapterError(f"{file}: {module} has LoRA tensors but is not in target_modules {targets!r}.",
                               hint="adapter_config.json does not describe this weights file.")
        layer = _LAYER.search(f".{module}.")
        if isinstance(layers, list) and (layer is None or int(layer[1]) not in layers):
            raise AdapterError(f"{file}: {module} has LoRA tensors but its layer is not in layers_to_transform "
                               f"{layers!r}.", hint="adapter_config.json does not describe this weights file.")
        rank = a.shape[0]
        alpha = _pattern(config.get("alpha_pattern"), module, config["lora_alpha"])
        expected = _pattern(config.get("rank_pattern"), module, config["r"])
        if rank != expected:
            raise AdapterError(f"{file}: {module}'s LoRA rank is {rank}, but adapter_config.json says {expected}.",
                               hint="adapter_config.json does not describe this weights file.")
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        modules[f"{module}.weight"] = LoraModule(f"{module}.weight", a, b, float(scale),
                                                  (names[module]["A"], names[module]["B"]))
    return modules


def _targeted(module: str, targets: Any) -> bool:
    """PEFT's rule: a string is a full-match regex; a list holds module-name suffixes."""
    if isinstance(targets, str):
        return targets == "all-linear" or re.fullmatch(targets, module) is not None
    return any(module == t or module.endswith(f".{t}") for t in targets if isinstance(t, str))


def _pattern(patterns: Any, module: str, default: float) -> float:
    """A per-module rank/alpha from PEFT's rank_pattern/alpha_pattern (regex keys matched at the name's end)."""
    if isinstance(patterns, dict):
        for key, value in patterns.items():
            if re.match(rf"(.*\.)?({key})$", module):
                return float(value)
    return float(default)


def _read(info: TensorInfo, weight: str) -> np.ndarray:
    return read_tensor(info, f"the LoRA tensors for {weight}", AdapterError, unreadable="Check the adapter's files.",
                       truncated="The file is truncated; save the adapter again.").astype(np.float32)


class MergedCheckpoint(Checkpoint):
    """A base checkpoint that reads `W + scale * B @ A` for the weights `adapter` adapts (and `W` otherwise).

    Every builder reads its weights through `read`, so int4 quantization (RTN, clip, GPTQ) sees the
    merged weights, as do packed projections (q/k/v joined) and experts.
    """

    def __init__(self, base: Checkpoint, adapter: LoraAdapter) -> None:  # the base's state, shared (no re-read)
        adapter.check_base(base)
        self.__dict__.update(base.__dict__)
        self.base, self.adapter = base, adapter

    def read(self, name: str, dtype: np.dtype | type = np.float32) -> np.ndarray:
        """The base tensor, with the adapter's update added when it adapts it (in float32, then cast)."""
        array = self.base.read(name, np.float32)
        if name in self.adapter.modules:
            array = array + self.adapter.delta(name)
        return array if array.dtype == np.dtype(dtype) else array.astype(dtype)

    def sha256(self) -> str:
        """The base weights' digest (the adapter is recorded separately)."""
        return self.base.sha256()

    def check_applied(self, architecture: str) -> None:
        """Refuse an adapter that adapts a tensor the builder never asked for, so never merged: a tied model's
        stored `lm_head.weight` copy (the graph's head reads the embedding), or any other unread tensor.

        Call it after the graph is built (the builder asks for every tensor it will read while building).

        Raises:
            AdapterError: naming the first adapted tensor the graph does not read.
        """
        unread = [weight for weight in self.adapter.modules if weight not in self.used]
        if unread:
            raise AdapterError(
                f"{self.adapter.path}: the adapter adapts {unread[0]!r}, which the {architecture} graph does not "
                f"read (it would be dropped from the merge without a word"
                f"{'; this model ties its LM head to the embedding' if unread[0] == 'lm_head.weight' else ''}).",
                hint="Train the adapter without this module, or merge it in PyTorch and export the merged "
                     "checkpoint.")


def adapter_names(specs: Iterable[str]) -> list[tuple[str, str]]:
    """Parse `NAME=PATH` specs (the CLI's `--adapter`), refusing bad or repeated names."""
    out: list[tuple[str, str]] = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        check_adapter_name(name.strip() if sep else "")
        if not sep or not path:
            raise AdapterError(f"--adapter {spec!r} is not NAME=PATH.", hint="e.g. --adapter support=./my-adapter")
        if any(name == seen for seen, _ in out):
            raise AdapterError(f"The adapter name {name!r} is given twice.", hint="Give each adapter its own name.")
        out.append((name, path))
    return out


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_adapter_name(name: str) -> str:
    """An adapter name is a short file-name-safe word (it names `NAME.onnx_adapter` and the API's `model`)."""
    if not _NAME.match(name) or name in ("base",) or name.endswith(".onnx_adapter"):
        raise AdapterError(f"{name!r} is not a valid adapter name.",
                           hint="Use letters, digits, '.', '_' or '-' (up to 64, starting with a letter or digit; "
                                "not 'base').")
    return name


