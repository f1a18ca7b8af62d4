"""Export options, validated once where they enter (CLI or API)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from phi_onnx.errors import OptionsError

Precision = Literal["fp32", "fp16", "int4"]
Device = Literal["cpu", "cuda"]

PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "int4")
DEVICES: tuple[str, ...] = ("cpu", "cuda")


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
    """

    precision: Precision = "int4"
    device: Device = "cpu"
    block_size: int = 32
    symmetric: bool = True
    accuracy_level: int | None = None
    max_length: int | None = None

    def __post_init__(self) -> None:
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
        if self.max_length is not None and self.max_length < 1:
            raise OptionsError(f"Invalid max length {self.max_length}.", hint="Use a positive token count.")

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

    def variant(self) -> str:
        """A short folder-style name, e.g. `cpu-int4-rtn-block-32`."""
        if self.precision != "int4":
            return f"{self.device}-{self.precision}"
        kind = "rtn" if self.symmetric else "rtn-asym"
        return f"{self.device}-int4-{kind}-block-{self.block_size}"

    def to_dict(self) -> dict[str, Any]:
        """Every option, with defaults resolved, for the manifest."""
        data = asdict(self)
        data["accuracy_level"] = self.effective_accuracy_level
        data["io_dtype"] = self.io_dtype
        return data
