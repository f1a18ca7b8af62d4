"""Stream tensors out of (sharded) safetensors files, one at a time, without torch.

Each tensor is read with a plain file read into a fresh buffer, so a 7 GB checkpoint never has
more than one tensor resident (memory-mapping the whole file would grow the RSS with every page).
Pickle-based checkpoints are refused: they can run code when loaded.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import stat
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from phi_onnx.errors import CheckpointError, PhiOnnxError

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
#: What a weight may be stored as: builders read every weight as floats, and an integer tensor would be
#: converted to floats without complaint (the others are known so that a header holding them still parses).
WEIGHT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_MAX_HEADER = 100 * 1024 * 1024
_CORRUPT = "The file is corrupt; download it again."


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, dtype, shape and byte range (absolute offsets)."""

    file: Path
    dtype: np.dtype
    dtype_name: str
    shape: tuple[int, ...]
    begin: int
    end: int



def read_tensor(info: TensorInfo, what: str, error: type[PhiOnnxError], *, unreadable: str,
                truncated: str) -> np.ndarray:
    """The tensor `info` describes, read from its file (in its own dtype); `error` names `what` when the file
    cannot be read (hint `unreadable`) or ends early (hint `truncated`)."""
    size = info.end - info.begin
    buffer = np.empty(size, dtype=np.uint8)
    try:
        with info.file.open("rb") as handle:
            handle.seek(info.begin)
            read = handle.readinto(memoryview(buffer))
    except OSError as failure:
        raise error(f"Cannot read {what} from {info.file}: {failure.strerror or failure}.", hint=unreadable) \
            from failure
    if read != size:
        raise error(f"{info.file} ended while reading {what}.", hint=truncated)
    return buffer.view(info.dtype).reshape(info.shape)

class Checkpoint:
    """The tensors of a Hugging Face checkpoint folder, read lazily by name."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.files = weight_files(folder)
        self._tensors: dict[str, TensorInfo] = {}
        for file in self.files:
            self._tensors.update(_read_header(file))
        #: Names a builder asked for (`info`/`read`): what `check_all_read` compares the checkpoint with.
        self.used: set[str] = set()

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def names(self) -> list[str]:
        """All tensor names, in file order."""
        return list(self._tensors)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape by name, without counting any as asked for (`check_all_read`)."""
        return {name: info.shape for name, info in self._tensors.items()}

    def info(self, name: str) -> TensorInfo:
        """Dtype, shape and location of a tensor; a clear error if the checkpoint lacks it."""
        try:
            info = self._tensors[name]
            self.used.add(name)
        except KeyError:
            raise CheckpointError(
                f"The checkpoint in {self.folder} has no tensor {name!r}.",
                hint="The weights do not match config.json's architecture, or a shard is missing.",
            ) from None
        if info.dtype_name not in WEIGHT_DTYPES:
            raise CheckpointError(f"{info.file}: tensor {name!r} is stored as {info.dtype_name}, which phi-onnx does "
                                  "not read as a weight (it would be converted to floats silently).",
                                  hint=f"Save the weights as one of {', '.join(sorted(WEIGHT_DTYPES))}.")
        return info

    def read(self, name: str, dtype: np.dtype | type = np.float32) -> np.ndarray:
        """Read one tensor from disk and convert it to `dtype`."""
        info = self.info(name)
        array = read_tensor(info, f"tensor {name!r}", CheckpointError,
                            unreadable="Check that the checkpoint's files are readable.",
                            truncated="The file is truncated; download it again.")
        return array if array.dtype == np.dtype(dtype) else array.astype(dtype)

    def check_all_read(self, architecture: str, ignore: Iterable[str] = ()) -> None:
        """Refuse a checkpoint holding tensors the builder never asked for (as llama.cpp refuses unmapped
        tensors): they belong to a variant phi-onnx does not build, and dropping them would export a
        different model without a word. `ignore`: names known to carry nothing the graph needs (a tied
        LM head's copy); rotary `inv_freq` buffers are always ignored (recomputed from config.json).

        Raises:
            CheckpointError: naming the first unread tensors and how many there are.
        """
        skipped = set(ignore)
        unread = [name for name in self._tensors
                  if name not in self.used and name not in skipped and not name.endswith("rotary_emb.inv_freq")]
        if unread:
            shown = ", ".join(repr(name) for name in unread[:5]) + (f" and {len(unread) - 5} more" if len(unread) > 5
                                                                    else "")
            raise CheckpointError(
                f"The checkpoint in {self.folder} holds {len(unread)} tensor{'s' if len(unread) != 1 else ''} that "
                f"no part of the {architecture} graph reads: {shown}.",
                hint="These weights belong to a variant phi-onnx does not build (exporting without them would "
                     "change the model). Use a checkpoint of a supported architecture (`phi-onnx models`), or "
                     "remove the tensors if they are known to be unused.")

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


def weight_files(folder: Path) -> list[Path]:
    """The checkpoint's safetensors files (from its shard index, else `*.safetensors`).

    Raises:
        CheckpointError: no safetensors (pickles are named and refused, never loaded), a bad index, a shard
            missing or not a regular file.
    """
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = [_regular(folder / name) for name in _shard_names(index)]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{folder} is missing shards listed in its index: {', '.join(missing)}.",
                                  hint="The download is incomplete; download the missing files.")
        return files
    files = [_regular(path) for path in sorted(folder.glob("*.safetensors"))]
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


def _shard_names(index: Path) -> list[str]:
    """The shard file names an index lists, each a plain name inside the checkpoint folder."""
    hint = "Re-download the checkpoint's index file."
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, RecursionError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{index} is not a valid safetensors index ({error}).", hint=hint) from error
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index} is not a valid safetensors index (`weight_map` must map tensor names to "
                              "shard files).", hint=hint)
    names = list(dict.fromkeys(weight_map.values()))
    for name in names:
        # A shard elsewhere (an absolute path, ../other) would export another folder's weights.
        if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name:
            raise CheckpointError(f"{index} lists the shard {name!r}, which is not a file name inside the "
                                  "checkpoint folder.", hint=hint)
    return names


def _regular(path: Path) -> Path:
    """`path` when it is missing or a regular file (symlinks followed); else a CheckpointError."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return path
    except OSError as error:  # a symlink loop, a permission problem
        raise CheckpointError(f"Cannot read {path}: {error.strerror or error}.",
                              hint="Replace it with the real weights file.") from error
    if not stat.S_ISREG(info.st_mode):
        kind = "a folder" if stat.S_ISDIR(info.st_mode) else "a pipe" if stat.S_ISFIFO(info.st_mode) else \
            "not a regular file"
        raise CheckpointError(f"{path} is {kind}, not a weights file.", hint="Replace it with the real weights file.")
    return path


def _read_header(file: Path) -> dict[str, TensorInfo]:
    try:
        # O_NONBLOCK: a FIFO swapped in after the check above must not block the open.
        handle = os.fdopen(os.open(file, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb")
    except OSError as error:
        raise CheckpointError(f"Cannot read {file}: {error.strerror or error}.",
                              hint="Check the file and its permissions.") from error
    with handle:
        size = os.fstat(handle.fileno()).st_size
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise CheckpointError(f"{file} is not a regular file.", hint="Replace it with the real weights file.")
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{file} is too short to be a safetensors file ({size} bytes).",
                                  hint="The file is truncated or empty; download it again.")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(_MAX_HEADER, size - 8):
            raise CheckpointError(f"{file} has a corrupt or truncated safetensors header.",
                                  hint="Download the file again.")
        raw = handle.read(header_len)
    return parse_header(raw, file, size)


def parse_header(raw: bytes, file: Path, size: int) -> dict[str, TensorInfo]:
    """The tensors a safetensors header describes, every field checked (the file is `size` bytes long).

    Raises:
        CheckpointError: not a JSON object, entries without a known dtype, a shape or byte range, ranges
            outside the data, overlapping one another, or not matching their shape.
    """
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, RecursionError, json.JSONDecodeError) as error:
        reason = "nested too deeply" if isinstance(error, RecursionError) else str(error)
        raise CheckpointError(f"{file} has a corrupt safetensors header ({reason}).",
                              hint="Download the file again.") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file} has a corrupt safetensors header (not a JSON object).", hint=_CORRUPT)
    base = 8 + len(raw)
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict):
                raise CheckpointError(f"{file}: the header's __metadata__ is not an object.", hint=_CORRUPT)
            continue
        tensors[name] = _tensor_info(file, name, entry, base, size)
    spans = sorted((info.begin, info.end, name) for name, info in tensors.items() if info.end > info.begin)
    for (_, end, first), (begin, _, second) in itertools.pairwise(spans):
        if begin < end:
            raise CheckpointError(f"{file}: tensors {first!r} and {second!r} overlap.", hint=_CORRUPT)
    return tensors


def _tensor_info(file: Path, name: str, entry: Any, base: int, size: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise CheckpointError(f"{file}: the header's entry for {name!r} is not an object.", hint=_CORRUPT)
    dtype_name = entry.get("dtype")
    dtype = _DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
    if dtype is None or not isinstance(dtype_name, str):
        raise CheckpointError(f"{file}: tensor {name!r} has unsupported dtype {dtype_name!r}.",
                              hint=f"Supported: {', '.join(sorted(WEIGHT_DTYPES))} for weights.")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not isinstance(shape, list) or not all(_count(d) for d in shape):
        raise CheckpointError(f"{file}: tensor {name!r} has no valid shape ({shape!r}).", hint=_CORRUPT)
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_count(x) for x in offsets) \
            or offsets[0] > offsets[1]:
        raise CheckpointError(f"{file}: tensor {name!r} has invalid data_offsets ({offsets!r}).", hint=_CORRUPT)
    begin, end = offsets
    count = 1
    for dim in shape:
        count *= dim  # Python ints: a hostile shape cannot overflow into a small product
    if end - begin != count * dtype.itemsize:
        raise CheckpointError(f"{file}: tensor {name!r} has a byte range that does not match its shape.",
                              hint=_CORRUPT)
    if base + end > size:
        raise CheckpointError(
            f"{file} is truncated: tensor {name!r} ends at byte {base + end} but the file has {size} bytes.",
            hint="The download was interrupted; delete the file and download it again.",
        )
    return TensorInfo(file, dtype, dtype_name, tuple(shape), base + begin, base + end)


def _count(value: Any) -> bool:
    """A non-negative JSON integer (not a bool, not a float, not a string)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
