"""A small GGUF reader: metadata, and tensors dequantized to float32.

GGUF (llama.cpp's file format, version 2 and 3) is a header of typed key/value metadata, a table of
tensor descriptions, and the tensor data at aligned offsets. We read the handful of tensor types
that small checkpoints use — F32, F16, BF16, Q8_0, Q4_0, Q4_1 — which is all the zoo's base model
needs, and say so clearly for any other. Reading it ourselves keeps the ``gguf`` and ``accelerate``
packages out of our dependencies and lets us build the tokenizer exactly (see ``base.py``).

Block formats (32 weights per block, little-endian):
- Q8_0: fp16 scale ``d``, 32 int8 ``q``: ``w = d * q``.
- Q4_0: fp16 ``d``, 16 bytes of nibbles: ``w = d * (q - 8)``.
- Q4_1: fp16 ``d``, fp16 ``m``, 16 bytes of nibbles: ``w = d * q + m``.
  In Q4_0/Q4_1, weight ``j < 16`` is byte ``j``'s low nibble and weight ``j + 16`` its high nibble.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mergearena.errors import CheckpointError

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
BLOCK = 32

# Metadata value types: id -> struct format (scalars); 8 is a string, 9 an array.
_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING, _ARRAY = 8, 9

F32, F16, Q4_0, Q4_1, Q8_0, BF16 = 0, 1, 2, 3, 8, 30
TYPE_NAMES = {F32: "F32", F16: "F16", Q4_0: "Q4_0", Q4_1: "Q4_1", Q8_0: "Q8_0", BF16: "BF16"}
# Bytes per block of BLOCK weights (per weight for the plain float types).
_BLOCK_BYTES = {Q4_0: 18, Q4_1: 20, Q8_0: 34}
_ELEMENT_BYTES = {F32: 4, F16: 2, BF16: 2}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order: slowest dimension first (GGUF lists fastest first)
    type: int
    offset: int  # from the start of the data section

    @property
    def type_name(self) -> str:
        return TYPE_NAMES.get(self.type, f"type {self.type}")

    @property
    def supported(self) -> bool:
        return self.type in _ELEMENT_BYTES or self.type in _BLOCK_BYTES

    @property
    def numel(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count

    @property
    def nbytes(self) -> int:
        if self.type in _ELEMENT_BYTES:
            return self.numel * _ELEMENT_BYTES[self.type]
        return self.numel // BLOCK * _BLOCK_BYTES[self.type]


class _Cursor:
    def __init__(self, buffer: memoryview, path: Path) -> None:
        self.buffer, self.path, self.pos = buffer, path, 0

    def unpack(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buffer):
            raise CheckpointError(f"{self.path}: truncated GGUF header at byte {self.pos}.")
        (value,) = struct.unpack_from(fmt, self.buffer, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        length = self.unpack("<Q")
        raw = bytes(self.buffer[self.pos : self.pos + length])
        if len(raw) != length:
            raise CheckpointError(f"{self.path}: truncated GGUF string at byte {self.pos}.")
        self.pos += length
        return raw.decode("utf-8", errors="replace")

    def value(self, kind: int) -> Any:
        if kind in _SCALARS:
            return self.unpack(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item_kind, count = self.unpack("<I"), self.unpack("<Q")
            return [self.value(item_kind) for _ in range(count)]
        raise CheckpointError(f"{self.path}: unknown GGUF metadata type {kind} at byte {self.pos}.")


class GGUFFile:
    """An open GGUF file: ``metadata`` (dict), ``tensors`` (name -> TensorInfo), ``read(name)``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self._file = open(self.path, "rb")
        except OSError as error:
            raise CheckpointError(f"{self.path}: cannot open as a GGUF file ({error}).") from error
        try:
            self._map: mmap.mmap | None = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as error:  # ValueError: an empty file
            self._file.close()
            raise CheckpointError(f"{self.path}: cannot open as a GGUF file ({error}).") from error
        view = memoryview(self._map)
        try:
            self._parse(view)
        except BaseException:
            view.release()
            self.close()
            raise
        view.release()

    def _parse(self, view: memoryview) -> None:
        if bytes(view[:4]) != MAGIC:
            raise CheckpointError(f"{self.path}: not a GGUF file (no 'GGUF' magic).")
        cursor = _Cursor(view, self.path)
        cursor.pos = 4
        version = cursor.unpack("<I")
        if version not in (2, 3):
            raise CheckpointError(f"{self.path}: GGUF version {version} is not supported (2 or 3).")
        tensor_count, kv_count = cursor.unpack("<Q"), cursor.unpack("<Q")
        self.metadata: dict[str, Any] = {}
        for _ in range(kv_count):
            key = cursor.string()
            self.metadata[key] = cursor.value(cursor.unpack("<I"))
        self.tensors: dict[str, TensorInfo] = {}
        for _ in range(tensor_count):
            name = cursor.string()
            dims = [cursor.unpack("<Q") for _ in range(cursor.unpack("<I"))]
            kind, offset = cursor.unpack("<I"), cursor.unpack("<Q")
            self.tensors[name] = TensorInfo(name, tuple(reversed(dims)), kind, offset)
        alignment = int(self.metadata.get("general.alignment", DEFAULT_ALIGNMENT))
        self._data_start = -(-cursor.pos // alignment) * alignment
        for info in self.tensors.values():
            if info.supported and self._data_start + info.offset + info.nbytes > len(view):
                raise CheckpointError(
                    f"{self.path}: tensor {info.name} runs past the end of the file; the file is "
                    "truncated. Fetch it again."
                )

    def read(self, name: str) -> np.ndarray:
        """Tensor ``name`` as a float32 array of its torch shape."""
        info = self.tensors[name]
        if not info.supported:
            raise CheckpointError(
                f"{self.path}: tensor {name} is stored as {info.type_name}, which mergearena "
                "cannot "
                f"dequantize (supported: {', '.join(TYPE_NAMES.values())})."
            )
        if self._map is None:
            raise CheckpointError(f"{self.path}: closed; open the GGUF file again to read {name}")
        start = self._data_start + info.offset
        raw = np.frombuffer(self._map, dtype=np.uint8, count=info.nbytes, offset=start)
        if info.type == F32:
            values = raw.view(np.float32)
        elif info.type == F16:
            values = raw.view(np.float16).astype(np.float32)
        elif info.type == BF16:
            values = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            values = _dequantize_blocks(raw.reshape(-1, _BLOCK_BYTES[info.type]), info.type)
        return values.reshape(info.shape).copy()

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
        self._file.close()

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _nibbles(packed: np.ndarray) -> np.ndarray:
    """16 bytes per block -> 32 values: low nibbles first, then high nibbles."""
    return np.concatenate([packed & 0x0F, packed >> 4], axis=1).astype(np.float32)


def _dequantize_blocks(blocks: np.ndarray, kind: int) -> np.ndarray:
    scale = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
    if kind == Q8_0:
        return (scale * blocks[:, 2:].copy().view(np.int8).astype(np.float32)).reshape(-1)
    if kind == Q4_0:
        return (scale * (_nibbles(blocks[:, 2:]) - 8.0)).reshape(-1)
    minimum = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    return (scale * _nibbles(blocks[:, 4:]) + minimum).reshape(-1)
