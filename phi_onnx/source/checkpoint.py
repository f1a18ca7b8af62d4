"""Stream tensors out of (sharded) safetensors files, one at a time, without torch.

Each tensor is read with a plain file read into a fresh buffer, so a 7 GB checkpoint never has
more than one tensor resident (memory-mapping the whole file would grow the RSS with every page).
Pickle-based checkpoints are refused: they can run code when loaded.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from phi_onnx.errors import CheckpointError

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, dtype, shape and byte range (absolute offsets)."""

    file: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


class Checkpoint:
    """The tensors of a Hugging Face checkpoint folder, read lazily by name."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.files = _weight_files(folder)
        self._tensors: dict[str, TensorInfo] = {}
        for file in self.files:
            self._tensors.update(_read_header(file))

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def names(self) -> list[str]:
        """All tensor names, in file order."""
        return list(self._tensors)

    def info(self, name: str) -> TensorInfo:
        """Dtype, shape and location of a tensor; a clear error if the checkpoint lacks it."""
        try:
            return self._tensors[name]
        except KeyError:
            raise CheckpointError(
                f"The checkpoint in {self.folder} has no tensor {name!r}.",
                hint="The weights do not match config.json's architecture, or a shard is missing.",
            ) from None

    def read(self, name: str, dtype: np.dtype | type = np.float32) -> np.ndarray:
        """Read one tensor from disk and convert it to `dtype`."""
        info = self.info(name)
        size = info.end - info.begin
        buffer = np.empty(size, dtype=np.uint8)
        with info.file.open("rb") as handle:
            handle.seek(info.begin)
            if handle.readinto(memoryview(buffer)) != size:
                raise CheckpointError(f"{info.file} ended while reading tensor {name!r}.",
                                      hint="The file is truncated; download it again.")
        array = buffer.view(info.dtype).reshape(info.shape)
        return array if array.dtype == np.dtype(dtype) else array.astype(dtype)

    def sha256(self) -> str:
        """One digest over all weight files (their names and bytes), for provenance and caching."""
        digest = hashlib.sha256()
        for file in self.files:
            digest.update(file.name.encode())
            _feed(digest, file)
        return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """The sha256 of one file, read in chunks."""
    digest = hashlib.sha256()
    _feed(digest, path)
    return digest.hexdigest()


def _feed(digest: Any, path: Path) -> None:
    buffer = bytearray(1024 * 1024)  # one small reused buffer: hashing runs beside the export's writers
    view = memoryview(buffer)
    with path.open("rb") as handle:
        while read := handle.readinto(buffer):
            digest.update(view[:read])


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise CheckpointError(f"{index} is not a valid safetensors index ({error}).",
                                  hint="Re-download the checkpoint's index file.") from error
        files = [folder / name for name in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{folder} is missing shards listed in its index: {', '.join(missing)}.",
                                  hint="The download is incomplete; download the missing files.")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{folder} holds only pickle checkpoints ({', '.join(pickles[:3])}), which phi-onnx never "
            "loads: unpickling can run arbitrary code.",
            hint="Convert them once in a trusted environment: load with transformers and "
            "`model.save_pretrained(folder, safe_serialization=True)`.",
        )
    raise CheckpointError(f"{folder} has no weights (*.safetensors).",
                          hint="Pass the folder holding config.json and the model's *.safetensors files.")


def _read_header(file: Path) -> dict[str, TensorInfo]:
    size = file.stat().st_size
    with file.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{file} is too short to be a safetensors file ({size} bytes).",
                                  hint="The file is truncated or empty; download it again.")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(_MAX_HEADER, size - 8):
            raise CheckpointError(f"{file} has a corrupt or truncated safetensors header.",
                                  hint="Download the file again.")
        try:
            header = json.loads(handle.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CheckpointError(f"{file} has a corrupt safetensors header ({error}).",
                                  hint="Download the file again.") from error
    base = 8 + header_len
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = _DTYPES.get(entry.get("dtype"))
        if dtype is None:
            raise CheckpointError(f"{file}: tensor {name!r} has unsupported dtype {entry.get('dtype')!r}.",
                                  hint="Supported: BF16, F16, F32 (and integer types).")
        begin, end = (int(x) for x in entry["data_offsets"])
        shape = tuple(int(d) for d in entry["shape"])
        if end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
            raise CheckpointError(f"{file}: tensor {name!r} has a byte range that does not match its shape.",
                                  hint="The file is corrupt; download it again.")
        if base + end > size:
            raise CheckpointError(
                f"{file} is truncated: tensor {name!r} ends at byte {base + end} but the file has {size} bytes.",
                hint="The download was interrupted; delete the file and download it again.",
            )
        tensors[name] = TensorInfo(file, dtype, shape, base + begin, base + end)
    return tensors
