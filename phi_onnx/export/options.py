"""Export options, validated once where they enter (CLI or API)."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from phi_onnx.errors import OptionsError

Precision = Literal["fp32", "fp16", "int4"]
Device = Literal["cpu", "cuda"]
Algo = Literal["rtn", "clip", "gptq"]
Embeddings = Literal["auto", "full", "int4", "int8"]
Mix = Literal["none", "auto"]

# The choices, from the annotations (the CLI's and the recipe's choices come from these too).
PRECISIONS: tuple[str, ...] = typing.get_args(Precision)
EMBEDDINGS: tuple[str, ...] = typing.get_args(Embeddings)
DEVICES: tuple[str, ...] = typing.get_args(Device)
ALGOS: tuple[str, ...] = typing.get_args(Algo)
MIXES: tuple[str, ...] = typing.get_args(Mix)
#: `mix_budget` when `mix="auto"` and none is given: +10 % over the export with every projection at int4.
DEFAULT_MIX_BUDGET = 0.10


def _adapter_specs(specs: Iterable[str]) -> tuple[tuple[str, str], ...]:
    """`--adapter NAME=PATH` values as `adapters` pairs (AdapterError on a bad spec)."""
    from phi_onnx.source.adapter import adapter_names

    return tuple(adapter_names(specs))


@dataclass(frozen=True)
class ExportOptions:
    """What to build: weight precision, target execution provider, int4 settings.

    Attributes:
        precision: weight precision; int4 packs linear layers into MatMulNBits.
        device: the execution provider the graph is tuned for (IO dtype, genai_config).
        block_size: int4 block length along the input dimension (16..256, a power of two).
        symmetric: int4 without zero points (symmetric) or with them (asymmetric).
        accuracy_level: MatMulNBits compute accuracy (0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8);
            None picks 4 on CPU (int8 compute, fastest) and 0 on CUDA.
        max_length: default `search.max_length` in genai_config (the KV cache onnxruntime-genai
            preallocates); None uses min(context length, 4096).
        embeddings: the token embedding table: "full" in the activation dtype, "int4"/"int8" as
            GatherBlockQuantized (same block size and symmetry as the layers); "auto" is int8 for
            int4 exports, full otherwise. A tied model whose embedding and LM head have the same
            bits stores one table for both.
        lm_head_bits: bits of the LM head's MatMulNBits in int4 exports (4 or 8); None: 8.
        algo: how int4 weights are chosen: "rtn" round-to-nearest (fastest), "clip" a per-block
            search of the clipping range (no data needed), "gptq" GPTQ layer by layer on calibration
            text. All write the same MatMulNBits layout.
        calibration: calibration text for "gptq" and "mix" (and for "clip", which then weights its
            search by activation statistics): a text file's path, or a tuple of texts. None: the
            built-in text where calibration runs, no data under plain "clip".
        calibration_tokens: at most this many calibration tokens (whole 256-token windows); None:
            4096 (1024 where only `mix` uses the text). Calibration time grows with it.
        mix: "auto" keeps the projections whose int4 error matters most (measured layer by layer
            on the calibration text) at 8 bits, within `mix_budget`; "none" writes all at 4 bits.
        mix_budget: the extra size `mix="auto"` may spend, as a fraction of the export without it
            (0.10 = +10 %); None: 0.10.

        merge_adapter: a PEFT LoRA adapter folder merged into the weights (before quantization).
        adapters: (name, PEFT LoRA adapter folder) pairs: the graph gets LoRA inputs on the layers'
            projections and each adapter is written beside it as `name.onnx_adapter`.

    Defaults were chosen by measurement (KL divergence from the fp32 export and top-1 agreement on
    held-out text, on every trained fixture; see the README's Quantization section).
    """

    # Field metadata makes the command-line options of `export` and `quantize`, and the keys a `build` recipe's
    # variant accepts (phi_onnx.cli.options.export_options, phi_onnx.verify.build): "help" is the --help text,
    # a Literal annotation gives the choices; "path" ("file"/"dir") a path option (relative to the recipe in
    # a recipe); "flag" a bool's on/off names; "option", "metavar", "multiple" and "from_cli" a repeatable
    # option parsed into the field; "cli": False keeps a field out of both.
    precision: Precision = field(default="int4", metadata={"help": "Weight precision."})
    device: Device = field(default="cpu", metadata={"help": "Execution provider the model is built for."})
    block_size: int = field(default=32, metadata={"help": "int4 block size (16..256)."})
    symmetric: bool = field(default=True, metadata={
        "help": "int4 without zero points (symmetric) or with them.", "flag": "--symmetric/--asymmetric"})
    accuracy_level: int | None = field(default=None, metadata={
        "help": "MatMulNBits accuracy level (default: 4 on CPU, 0 on CUDA).", "range": (0, 4)})
    max_length: int | None = field(default=None, metadata={
        "help": "Default max_length in genai_config (default: min(context, 4096))."})
    embeddings: Embeddings = field(default="auto", metadata={
        "help": "Embedding table: full (activation dtype) or block-quantized int4/int8; auto = int8 for int4 "
                "exports, full otherwise."})
    lm_head_bits: int | None = field(default=None, metadata={
        "help": "Bits of the LM head in int4 exports: 4 or 8 (default 8).", "choices": (4, 8)})
    algo: Algo = field(default="rtn", metadata={
        "help": "int4 algorithm: rtn round-to-nearest (fastest), clip per-block range search (no data), gptq "
                "layer-by-layer GPTQ on calibration text (best quality, slower)."})
    calibration: str | tuple[str, ...] | None = field(default=None, metadata={
        "help": "Calibration text file for --algo gptq/clip and --mix auto (default: a built-in text).",
        "path": "file"})
    calibration_tokens: int | None = field(default=None, metadata={
        "help": "At most this many calibration tokens (default 4096, 1024 for --mix alone; more takes longer)."})
    mix: Mix = field(default="none", metadata={
        "help": "Mixed precision: auto keeps the projections whose int4 error matters most (measured on the "
                "calibration text) at 8 bits, within --mix-budget; none keeps every projection at 4 bits."})
    mix_budget: float | None = field(default=None, metadata={
        "help": "Extra size --mix auto may spend, as a fraction of the export without it (default 0.10 = +10 %)."})
    merge_adapter: str | None = field(default=None, metadata={
        "help": "A PEFT LoRA adapter folder to merge into the weights (before quantization).", "path": "dir"})
    adapters: tuple[tuple[str, str], ...] = field(default=(), metadata={
        "help": "A PEFT LoRA adapter to ship switchable beside the base as NAME.onnx_adapter (repeatable).",
        "option": "--adapter", "metavar": "NAME=PATH", "multiple": True, "path": "dir",
        "from_cli": _adapter_specs})

    def __post_init__(self) -> None:
        _check_types(self)
        _check_adapters(self)
        if self.precision not in PRECISIONS:
            raise OptionsError(f"Unknown precision {self.precision!r}.",
                               hint=f"Choose one of: {', '.join(PRECISIONS)}.")
        if self.device not in DEVICES:
            raise OptionsError(f"Unknown device {self.device!r}.", hint=f"Choose one of: {', '.join(DEVICES)}.")
        if self.precision == "fp16" and self.device == "cpu":
            raise OptionsError(
                "fp16 on CPU is refused: ONNX Runtime's CPU kernels run fp16 models several times slower "
                "than fp32, and some ops fall back to casts.",
                hint="For CPU use --precision fp32 or --precision int4; for fp16 use --device cuda.")
        if self.precision == "fp32" and self.device == "cuda":
            raise OptionsError(
                "fp32 on CUDA is refused: ONNX Runtime's CUDA GroupQueryAttention runs only in fp16/bf16.",
                hint="For CUDA use --precision fp16 or --precision int4; for fp32 use --device cpu.")
        if self.block_size < 16 or self.block_size > 256 or self.block_size & (self.block_size - 1):
            raise OptionsError(f"Invalid int4 block size {self.block_size}.",
                               hint="Use a power of two from 16 to 256 (32 is the default).")
        if self.accuracy_level is not None and self.accuracy_level not in (0, 1, 2, 3, 4):
            raise OptionsError(f"Invalid accuracy level {self.accuracy_level}.",
                               hint="Use 0 (unset), 1 (fp32), 2 (fp16), 3 (bf16) or 4 (int8).")
        if self.algo not in ALGOS:
            raise OptionsError(f"Unknown int4 algorithm {self.algo!r}.", hint=f"Choose one of: {', '.join(ALGOS)}.")
        if self.mix not in MIXES:
            raise OptionsError(f"Unknown mix setting {self.mix!r}.", hint=f"Choose one of: {', '.join(MIXES)}.")
        if self.mix != "none" and self.precision != "int4":
            raise OptionsError(f"Mixed precision applies to int4 exports, not {self.precision}.",
                               hint="Add --precision int4, or drop --mix.")
        if self.mix_budget is not None:
            if self.mix == "none":
                raise OptionsError("A mix budget was given, but --mix is none.",
                                   hint="Add --mix auto, or drop --mix-budget.")
            if not 0 < self.mix_budget <= 1:
                raise OptionsError(f"Invalid mix budget {self.mix_budget}.",
                                   hint="Use a fraction of the export's size above 0 and at most 1 (0.10 = +10 %).")
        if self.calibration is not None and self.algo == "rtn" and self.mix == "none":
            raise OptionsError("Calibration text was given, but round-to-nearest (--algo rtn) uses none.",
                               hint="Pass --algo gptq, --algo clip or --mix auto to use it, or drop --calibration.")
        if self.calibration_tokens is not None:
            if not self.calibrates:
                raise OptionsError(f"A calibration token count was given, but --algo {self.algo} without "
                                   "--calibration or --mix auto uses no calibration.",
                                   hint="Pass --algo gptq, --mix auto (or --calibration FILE with clip), or drop "
                                        "--calibration-tokens.")
            if self.calibration_tokens < 64:
                raise OptionsError(f"Invalid calibration token count {self.calibration_tokens}.",
                                   hint="Use at least 64 tokens (a few thousand calibrate well).")
        if isinstance(self.calibration, list):
            object.__setattr__(self, "calibration", tuple(self.calibration))  # hashable, like the rest
        if self.max_length is not None and self.max_length < 1:
            raise OptionsError(f"Invalid max length {self.max_length}.", hint="Use a positive token count.")
        if self.embeddings not in EMBEDDINGS:
            raise OptionsError(f"Unknown embeddings setting {self.embeddings!r}.",
                               hint=f"Choose one of: {', '.join(EMBEDDINGS)}.")
        if self.lm_head_bits is not None and self.lm_head_bits not in (4, 8):
            raise OptionsError(f"Invalid LM head bits {self.lm_head_bits}.", hint="Use 4 or 8.")
        if self.precision != "int4" and (self.embeddings in ("int4", "int8") or self.lm_head_bits not in (None, 4)):
            raise OptionsError(f"Quantized embeddings and LM head bits apply to int4 exports, not {self.precision}.",
                               hint="Add --precision int4, or drop --embeddings/--lm-head-bits.")

    @property
    def io_dtype(self) -> str:
        """Activation and KV cache dtype: fp16 on CUDA, fp32 on CPU."""
        return "fp16" if self.device == "cuda" else "fp32"

    @property
    def effective_accuracy_level(self) -> int:
        """The MatMulNBits accuracy level actually written."""
        if self.accuracy_level is not None:
            return self.accuracy_level
        return 4 if self.device == "cpu" else 0

    @property
    def calibrates(self) -> bool:
        """Whether the int4 export runs on calibration text: `gptq` and `mix="auto"` always, `clip` when a
        text is given."""
        return self.algo == "gptq" or self.mix == "auto" or (self.algo == "clip" and self.calibration is not None)

    @property
    def weights_calibration(self) -> bool:
        """Whether the int4 weights themselves depend on calibration text (`gptq`, `clip` given a text);
        `mix="auto"` alone uses it only to choose which projections get 8 bits."""
        return self.algo == "gptq" or (self.algo == "clip" and self.calibration is not None)

    @property
    def resolved_calibration_tokens(self) -> int:
        """The calibration token budget, the default filled in (used where `calibrates`): 4096, or where only
        mixed precision uses the text (to rank the projections), the tokens its measurement runs on."""
        from phi_onnx.quantize.calibration import MAX_TOKENS
        from phi_onnx.quantize.mix import SENSITIVITY_TOKENS

        if self.calibration_tokens:
            return self.calibration_tokens
        return MAX_TOKENS if self.weights_calibration else SENSITIVITY_TOKENS

    @property
    def resolved_embeddings(self) -> str:
        """The embedding setting with "auto" resolved: int8 for int4 exports, full otherwise."""
        if self.embeddings != "auto":
            return self.embeddings
        return "int8" if self.precision == "int4" else "full"

    @property
    def resolved_lm_head_bits(self) -> int:
        """The LM head's bits, the default filled in: 8 in int4 exports (4, unused, otherwise)."""
        if self.lm_head_bits is not None:
            return self.lm_head_bits
        return 8 if self.precision == "int4" else 4

    @property
    def resolved_mix_budget(self) -> float:
        """`mix_budget` with the default filled in (used where `mix="auto"`)."""
        return DEFAULT_MIX_BUDGET if self.mix_budget is None else self.mix_budget

    def variant(self) -> str:
        """A short folder-style name, e.g. `cpu-int4-rtn-block-32`."""
        if self.precision != "int4":
            return f"{self.device}-{self.precision}"
        kind = self.algo if self.symmetric else f"{self.algo}-asym"
        mix = "-mix" if self.mix == "auto" else ""
        return f"{self.device}-int4-{kind}-block-{self.block_size}{mix}"

    def to_dict(self) -> dict[str, Any]:
        """Every option, with defaults resolved, for the manifest."""
        data = asdict(self)
        data["accuracy_level"] = self.effective_accuracy_level
        if isinstance(self.calibration, tuple):  # the texts themselves are recorded by their sha256
            data["calibration"] = f"<{len(self.calibration)} texts>"
        data["io_dtype"] = self.io_dtype
        data["embeddings"] = self.resolved_embeddings
        data["lm_head_bits"] = self.resolved_lm_head_bits
        # Only where calibration runs: an rtn export's record (and its store key) is what it was before
        # the option existed.
        del data["calibration_tokens"]
        # Recorded only when given (the manifest records the adapters themselves, with their sha256).
        for name in ("merge_adapter", "adapters"):
            if not data[name]:
                del data[name]
        if self.adapters:
            data["adapters"] = dict(self.adapters)
        if self.calibrates:
            data["calibration_tokens"] = self.resolved_calibration_tokens
        # Likewise only where mixed precision is used.
        del data["mix"], data["mix_budget"]
        if self.mix != "none":
            data["mix"] = self.mix
            data["mix_budget"] = self.resolved_mix_budget
        return data


def option_type(annotation: Any) -> tuple[type, bool]:
    """The Python type a field's value must have (a Literal's: its values' type) and whether None is allowed;
    None for a field checked elsewhere (`adapters`, `calibration`)."""
    args = typing.get_args(annotation)
    optional = typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args
    if optional:
        args = tuple(arg for arg in args if arg is not type(None))
        annotation = args[0] if len(args) == 1 else annotation
    if typing.get_origin(annotation) is Literal:
        annotation = type(typing.get_args(annotation)[0])
    if annotation in (str, int, float, bool):
        return annotation, optional
    raise TypeError(f"no plain type for {annotation!r}")  # a bug: the field needs its own check


def _plain_types() -> dict[str, tuple[type, bool]]:
    """Each field's type (None also allowed where flagged); bool is not an int here. Fields of other kinds
    (`calibration`: a path or texts; `adapters`: pairs) have their own checks."""
    hints = typing.get_type_hints(ExportOptions)
    out: dict[str, tuple[type, bool]] = {}
    for item in dataclasses.fields(ExportOptions):
        try:
            out[item.name] = option_type(hints[item.name])
        except TypeError:
            continue
    return out


def _check_adapters(options: ExportOptions) -> None:
    """`adapters` as a tuple of (valid name, path) pairs, each name once."""
    from phi_onnx.source.adapter import check_adapter_name

    pairs = options.adapters
    if isinstance(pairs, dict):
        pairs = tuple(pairs.items())
    if not isinstance(pairs, list | tuple) or not all(
            isinstance(p, list | tuple) and len(p) == 2 and all(isinstance(x, str) for x in p) for p in pairs):
        raise OptionsError(f"ExportOptions.adapters must be (name, path) pairs, not {pairs!r}.",
                           hint='Pass e.g. ExportOptions(adapters=(("support", "./my-adapter"),)).')
    pairs = tuple((str(name), str(path)) for name, path in pairs)
    names = [name for name, _ in pairs]
    for name in names:
        check_adapter_name(name)
    if len(set(names)) != len(names):
        raise OptionsError("An adapter name is given twice.", hint="Give each adapter its own name.")
    object.__setattr__(options, "adapters", pairs)


def _check_types(options: ExportOptions) -> None:
    """Refuse wrongly typed options (block_size="32") before any comparison raises TypeError."""
    for name, (kind, optional) in _TYPES.items():
        if not hasattr(options, name):
            continue
        value = getattr(options, name)
        if value is None and optional:
            continue
        accepted = (int, float) if kind is float else kind  # 1 is a fine fraction; True is not
        if not isinstance(value, accepted) or (kind in (int, float) and isinstance(value, bool)):
            wanted = {str: "a string", int: "a whole number", bool: "True or False", float: "a number"}[kind]
            raise OptionsError(f"ExportOptions.{name} must be {wanted}{' or None' if optional else ''}, "
                               f"not {type(value).__name__} {value!r}.",
                               hint=f"Pass e.g. ExportOptions({name}={getattr(ExportOptions, name, None)!r}).")


#: The Python type each option must have, from the annotations.
_TYPES: dict[str, tuple[type, bool]] = _plain_types()
