"""Read Hugging Face checkpoints lazily, one tensor at a time.

Opening a checkpoint parses only the safetensors headers (8-byte little-endian length, then JSON),
so listing a 70B model's tensors reads a few kB. Tensor data is read by ``Checkpoint.get`` when the
merge engine asks for it. PyTorch ``.bin`` files are accepted only through
``torch.load(weights_only=True, mmap=True)``: a pickle that needs code is refused.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from mergearena.errors import CheckpointError

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN_FILE = "pytorch_model.bin"
TORCH_BIN_INDEX = "pytorch_model.bin.index.json"

# safetensors dtype codes → torch dtypes (only those torch can hold).
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
if hasattr(torch, "float8_e8m0fnu"):
    SAFETENSORS_DTYPES["F8_E8M0"] = torch.float8_e8m0fnu
TORCH_TO_SAFETENSORS_DTYPE = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}

# safetensors itself refuses headers above 100 MB; a larger length means it is not safetensors.
MAX_HEADER_BYTES = 100_000_000

_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")
_NUM_LAYERS_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


@dataclass(frozen=True)
class TensorInfo:
    """What a checkpoint says about one tensor, known without reading its data."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path
    offset: int = 0  # where the tensor's bytes start in a safetensors file

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def _corrupt(file: Path, problem: str) -> CheckpointError:
    return CheckpointError(
        f"{file}: {problem}. The file looks truncated or corrupt; re-download or re-save it."
    )


def read_safetensors_header(file: Path) -> list[TensorInfo]:
    """Parse and validate one safetensors file's header; return its tensors sorted by offset.

    Reads only the header. Checks that every tensor's byte range fits its dtype and shape, lies
    inside the file, and that the file ends exactly where the last tensor does.
    """
    file = Path(file)
    try:
        file_size = file.stat().st_size
        with file.open("rb") as stream:
            prefix = stream.read(8)
            if len(prefix) < 8:
                raise _corrupt(file, f"only {len(prefix)} bytes long, no safetensors header")
            header_length = int.from_bytes(prefix, "little")
            if header_length == 0 or header_length > MAX_HEADER_BYTES:
                raise _corrupt(file, f"header length {header_length} bytes is not plausible")
            if 8 + header_length > file_size:
                raise _corrupt(
                    file,
                    f"header says it is {header_length} bytes but the file has only "
                    f"{file_size - 8} bytes after the length prefix",
                )
            raw_header = stream.read(header_length)
    except OSError as error:
        raise CheckpointError(f"{file}: cannot read it ({error})") from error
    try:
        header = json.loads(raw_header)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _corrupt(file, f"header is not valid JSON ({error})") from error
    if not isinstance(header, dict):
        raise _corrupt(file, "header is not a JSON object")

    data_size = file_size - 8 - header_length
    entries: list[tuple[int, TensorInfo]] = []
    data_end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype_code = entry["dtype"]
            shape = tuple(int(size) for size in entry["shape"])
            begin, end = (int(offset) for offset in entry["data_offsets"])
        except (TypeError, KeyError, ValueError) as error:
            raise _corrupt(
                file, f"tensor {name!r} has a malformed header entry {entry!r}"
            ) from error
        dtype = SAFETENSORS_DTYPES.get(dtype_code)
        if dtype is None:
            raise CheckpointError(
                f"{file}: tensor {name!r} has dtype {dtype_code!r}, which mergearena cannot read "
                f"(known: {', '.join(SAFETENSORS_DTYPES)}). Convert the checkpoint to a supported "
                "dtype such as BF16 or F32."
            )
        expected_bytes = math.prod(shape) * dtype.itemsize
        if any(size < 0 for size in shape) or begin < 0 or end - begin != expected_bytes:
            raise _corrupt(
                file,
                f"tensor {name!r} ({dtype_code}, shape {list(shape)}) has data_offsets "
                f"[{begin}, {end}], which do not hold {expected_bytes} bytes",
            )
        if end > data_size:
            raise _corrupt(
                file,
                f"tensor {name!r} ends at byte {end} of the data region but the file holds only "
                f"{data_size} data bytes",
            )
        data_end = max(data_end, end)
        info = TensorInfo(name, shape, dtype, file, offset=8 + header_length + begin)
        entries.append((begin, info))
    if data_end != data_size:
        raise _corrupt(
            file,
            f"its tensors end at data byte {data_end} but the file holds {data_size} data bytes",
        )
    entries.sort(key=lambda item: item[0])
    position = 0
    for begin, info in entries:
        if begin != position:
            raise _corrupt(
                file,
                f"tensor {info.name!r} starts at data byte {begin}, not {position}; tensors "
                "overlap or leave gaps",
            )
        position += info.nbytes
    return [info for _, info in entries]


def _pread_into(descriptor: int, info: TensorInfo, view: memoryview, start: int) -> None:
    """Fill ``view`` with bytes ``[start, start + len(view))`` of one tensor's data."""
    done = 0
    while done < len(view):
        try:
            count = os.preadv(descriptor, [view[done:]], info.offset + start + done)
        except OSError as error:
            raise CheckpointError(
                f"{info.file}: cannot read tensor {info.name!r} ({error})"
            ) from error
        if count == 0:
            raise _corrupt(info.file, f"it ended while reading tensor {info.name!r}")
        done += count


def _pread_tensor(descriptor: int, info: TensorInfo) -> torch.Tensor:
    """Read one tensor's bytes into a fresh tensor the caller owns."""
    buffer = torch.empty(info.nbytes, dtype=torch.uint8)
    if info.nbytes:
        _pread_into(descriptor, info, buffer.numpy().data, 0)
    return buffer.view(info.dtype).reshape(info.shape)


def load_torch_bin(file: Path) -> dict[str, torch.Tensor]:
    """Load a PyTorch ``.bin`` state dict memory-mapped, refusing pickles that need code to run."""
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as error:
        found = re.search(
            r"WeightsUnpickler error: (.+?)(?: was not an allowed|\. Please|\n|$)", str(error)
        )
        detail = found.group(1) if found else "it is not a plain tensor state dict"
        raise CheckpointError(
            f"{file}: refusing to load this PyTorch pickle because unpickling it would run code "
            f"({detail}); mergearena loads .bin files only with torch.load(weights_only=True). "
            "If you trust the file, convert it to safetensors (load it, then save_pretrained) "
            "and use that."
        ) from error
    except (RuntimeError, OSError, EOFError, ValueError) as error:
        raise CheckpointError(
            f"{file}: cannot load this PyTorch checkpoint ({error}). It may be truncated, corrupt, "
            "or saved in the legacy non-zip format; convert it to safetensors."
        ) from error
    if not isinstance(state, dict) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in state.items()
    ):
        raise CheckpointError(
            f"{file}: expected a state dict of name → tensor, got {type(state).__name__}. "
            "Convert the checkpoint to safetensors with save_pretrained."
        )
    return state


def _read_json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(
            f"{file}: cannot parse it as JSON ({error}); fix or re-download it."
        ) from error
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(data).__name__}.")
    return data


def _shards_from_index(index_file: Path) -> tuple[list[Path], dict[str, str]]:
    index = _read_json(index_file)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_file}: has no 'weight_map'; re-download or re-save it.")
    shard_names = sorted(set(weight_map.values()))
    shards = [index_file.parent / name for name in shard_names]
    for shard in shards:
        if not shard.is_file():
            raise CheckpointError(
                f"{shard}: shard named in {index_file.name} is missing from {index_file.parent}; "
                "the download is incomplete, re-download the checkpoint."
            )
    return shards, weight_map


class Checkpoint:
    """A Hugging Face model directory whose tensors are read one at a time, on demand.

    ``tensors`` maps each name to its ``TensorInfo`` in file order (by shard, then offset), so
    reading in that order walks each file front to back.
    """

    def __init__(
        self,
        path: Path,
        config: dict[str, Any],
        tensors: dict[str, TensorInfo],
        loaded: dict[str, torch.Tensor] | None = None,
    ) -> None:
        self.path = path
        self.config = config
        self.tensors = tensors
        self._loaded = loaded or {}  # tensors of memory-mapped .bin files
        self._handles: dict[Path, int] = {}
        self._handles_lock = threading.Lock()

    @classmethod
    def open(cls, path: str | Path) -> Checkpoint:
        """Open a model directory: ``model.safetensors``, a safetensors index, or ``.bin``."""
        path = Path(path).expanduser()
        if not path.exists():
            raise CheckpointError(f"{path}: no such checkpoint directory.")
        if not path.is_dir():
            raise CheckpointError(
                f"{path}: expected a Hugging Face model directory, got a file; pass the directory "
                "that holds config.json and the weights."
            )
        config_file = path / "config.json"
        config = _read_json(config_file) if config_file.is_file() else {}
        for name in (SAFETENSORS_FILE, SAFETENSORS_INDEX, TORCH_BIN_FILE, TORCH_BIN_INDEX):
            candidate = path / name
            if not candidate.is_file():
                continue
            if name.endswith(".index.json"):
                files, weight_map = _shards_from_index(candidate)
                checkpoint = cls.from_weight_files(path, files, config)
                checkpoint._check_against_index(candidate, weight_map)
                return checkpoint
            return cls.from_weight_files(path, [candidate], config)
        hint = ""
        if (path / "adapter_config.json").is_file():
            hint = " It holds a PEFT adapter (adapter_config.json): load it as an adapter instead."
        else:
            found = sorted(p.name for p in path.iterdir() if p.suffix in {".safetensors", ".bin"})
            if found:
                hint = f" Found weight files with other names: {', '.join(found[:5])}."
        raise CheckpointError(
            f"{path}: no model weights found; looked for {SAFETENSORS_FILE}, {SAFETENSORS_INDEX}, "
            f"{TORCH_BIN_FILE} and {TORCH_BIN_INDEX}.{hint}"
        )

    @classmethod
    def from_weight_files(
        cls, path: Path, files: list[Path], config: dict[str, Any] | None = None
    ) -> Checkpoint:
        """A checkpoint of explicit ``.safetensors`` / ``.bin`` files (e.g. an adapter's)."""
        tensors: dict[str, TensorInfo] = {}
        loaded: dict[str, torch.Tensor] = {}
        for file in files:
            if file.suffix == ".safetensors":
                infos = read_safetensors_header(file)
            else:
                state = load_torch_bin(file)
                loaded.update(state)
                infos = [
                    TensorInfo(name=name, shape=tuple(t.shape), dtype=t.dtype, file=file)
                    for name, t in state.items()
                ]
            for info in infos:
                if info.name in tensors:
                    raise CheckpointError(
                        f"{path}: tensor {info.name!r} appears in both "
                        f"{tensors[info.name].file.name} and {file.name}; the checkpoint is "
                        "inconsistent, re-save it."
                    )
                tensors[info.name] = info
        return cls(path, config or {}, tensors, loaded)

    def _check_against_index(self, index_file: Path, weight_map: dict[str, str]) -> None:
        for name, shard in weight_map.items():
            info = self.tensors.get(name)
            if info is None or info.file.name != shard:
                where = "no shard" if info is None else info.file.name
                raise CheckpointError(
                    f"{index_file}: lists tensor {name!r} in {shard}, but {where} holds it; "
                    "the index and shards disagree, re-download the checkpoint."
                )

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor: a fresh CPU tensor the caller owns and may modify in place."""
        info = self.tensors.get(name)
        if info is None:
            raise CheckpointError(
                f"{self.path}: checkpoint has no tensor {name!r} ({len(self.tensors)} tensors; "
                "check the tensor name or the model architecture)."
            )
        if info.file.suffix != ".safetensors":
            loaded = self._loaded.get(name)
            if loaded is None:
                raise CheckpointError(f"{self.path}: checkpoint is closed; open it again.")
            return loaded.clone()
        return _pread_tensor(self._descriptor(info.file), info)

    def reads_bytes(self, name: str) -> bool:
        """Whether ``read_into`` can read tensor ``name``: it is stored raw, in a safetensors file
        (a ``.bin`` checkpoint's tensors come only whole, from ``get``)."""
        info = self.tensors.get(name)
        return info is not None and info.file.suffix == ".safetensors"

    def read_into(self, name: str, view: memoryview, start: int = 0) -> None:
        """Fill ``view`` with bytes ``[start, start + len(view))`` of tensor ``name``'s data, as
        stored (little-endian, its own dtype): a chunk at a time into a caller's buffer, such as a
        pinned staging buffer on its way to a GPU. Only where ``reads_bytes(name)``."""
        if not self.reads_bytes(name):
            raise CheckpointError(f"{self.path}: tensor {name!r} is not stored in safetensors.")
        info = self.tensors[name]
        if start < 0 or start + len(view) > info.nbytes:
            raise ValueError(
                f"bytes [{start}, {start + len(view)}) are outside tensor {name!r} "
                f"({info.nbytes} bytes)"
            )
        _pread_into(self._descriptor(info.file), info, view, start)

    def _descriptor(self, file: Path) -> int:
        # One descriptor per file, shared by the main thread and a prefetching thread: pread
        # needs no shared file position. Reading into our own buffer instead of memory-mapping
        # keeps the file's pages out of this process's resident memory.
        with self._handles_lock:
            descriptor = self._handles.get(file)
            if descriptor is None:
                try:
                    descriptor = os.open(file, os.O_RDONLY)
                except OSError as error:
                    raise CheckpointError(f"{file}: cannot open it ({error})") from error
                self._handles[file] = descriptor
            return descriptor

    @property
    def num_layers(self) -> int | None:
        """The number of transformer layers the config declares, or None if it declares none."""
        for config in (self.config, self.config.get("text_config") or {}):
            for key in _NUM_LAYERS_KEYS:
                value = config.get(key)
                if isinstance(value, int):
                    return value
        return None

    @staticmethod
    def layer_index(tensor_name: str) -> int | None:
        """The layer a tensor belongs to (``model.layers.3.mlp...`` → 3), or None."""
        match = _LAYER_INDEX.search(tensor_name)
        return int(match.group(1)) if match else None

    def close(self) -> None:
        with self._handles_lock:
            for descriptor in self._handles.values():
                os.close(descriptor)
            self._handles.clear()
        self._loaded.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {len(self.tensors)} tensors)"
