"""Write checkpoints: streamed safetensors shards, atomic output directories, support files.

Every output tensor's name, shape and dtype is known before the first one is computed, so each
shard's header is written up front and each tensor's bytes are appended as it arrives: memory stays
at one tensor. The whole output is built in a hidden sibling directory and renamed into place only
when complete, so an interrupted merge never leaves something that looks like a finished model.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import secrets
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import torch

from mergearena.checkpoints.reader import (
    SAFETENSORS_FILE,
    SAFETENSORS_INDEX,
    TORCH_TO_SAFETENSORS_DTYPE,
)
from mergearena.errors import CheckpointError, ShapeMismatchError

CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path, **metadata: str) -> None:
    """``safetensors.torch.save_file`` with the file mode the umask gives (it writes 0600), so
    other users, such as the arena's sandbox user, can read the cache like any other file."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt", **metadata})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _shard_name(index: int, count: int) -> str:
    return SAFETENSORS_FILE if count == 1 else f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def _write_tensor_bytes(stream: BinaryIO, tensor: torch.Tensor) -> None:
    """Append a tensor's raw little-endian bytes (any dtype, bf16 included) without copying it."""
    raw = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
    if raw.numel() == 0:
        return
    # A zero-copy view of the tensor's memory for file.write; `raw` stays alive during the write.
    buffer = (ctypes.c_ubyte * raw.numel()).from_address(raw.data_ptr())
    stream.write(memoryview(buffer))


class StreamingShardWriter:
    """Write ``plan`` (name, shape, dtype per tensor, in write order) as safetensors shards.

    Tensors go to shards in plan order, starting a new shard when the next tensor would push the
    current one past ``max_shard_bytes``. One shard is named ``model.safetensors``; several are
    ``model-0000i-of-0000N.safetensors`` with a ``model.safetensors.index.json``.
    """

    def __init__(
        self,
        directory: str | Path,
        plan: list[tuple[str, tuple[int, ...], torch.dtype]],
        max_shard_bytes: int = 5 * 2**30,
        metadata: dict[str, str] | None = None,
    ) -> None:
        if sys.byteorder != "little":
            raise CheckpointError("safetensors files are little-endian; this machine is not.")
        self.directory = Path(directory)
        self.plan = [(name, tuple(int(s) for s in shape), dtype) for name, shape, dtype in plan]
        self.metadata = {"format": "pt", **(metadata or {})}
        names = [name for name, _, _ in self.plan]
        if len(set(names)) != len(names):
            duplicate = next(name for name in names if names.count(name) > 1)
            raise CheckpointError(f"write plan names tensor {duplicate!r} twice.")
        for name, _, dtype in self.plan:
            if dtype not in TORCH_TO_SAFETENSORS_DTYPE:
                raise CheckpointError(f"tensor {name!r}: safetensors cannot store dtype {dtype}.")

        shards: list[list[int]] = [[]]  # plan indices per shard
        shard_bytes = 0
        for index, (_, shape, dtype) in enumerate(self.plan):
            nbytes = math.prod(shape) * dtype.itemsize
            if shards[-1] and shard_bytes + nbytes > max_shard_bytes:
                shards.append([])
                shard_bytes = 0
            shards[-1].append(index)
            shard_bytes += nbytes
        self.shard_files = [
            self.directory / _shard_name(i, len(shards)) for i in range(len(shards))
        ]
        self._shard_of = {index: s for s, indices in enumerate(shards) for index in indices}
        self._shards = shards
        self._next = 0
        self._stream: BinaryIO | None = None
        self._stream_shard = -1
        self.total_size = sum(math.prod(shape) * dtype.itemsize for _, shape, dtype in self.plan)

    def _header(self, shard: int) -> bytes:
        header: dict[str, object] = {"__metadata__": self.metadata}
        offset = 0
        for index in self._shards[shard]:
            name, shape, dtype = self.plan[index]
            nbytes = math.prod(shape) * dtype.itemsize
            header[name] = {
                "dtype": TORCH_TO_SAFETENSORS_DTYPE[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
        encoded += b" " * (-len(encoded) % 8)  # tensor data starts 8-byte aligned
        return len(encoded).to_bytes(8, "little") + encoded

    def _open_shard(self, shard: int) -> BinaryIO:
        if self._stream is not None:
            self._stream.close()
        self.directory.mkdir(parents=True, exist_ok=True)
        self._stream = self.shard_files[shard].open("wb")
        self._stream_shard = shard
        self._stream.write(self._header(shard))
        return self._stream

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next tensor of the plan; its name, shape and dtype must match the plan."""
        if self._next >= len(self.plan):
            raise CheckpointError(
                f"{self.directory}: tensor {name!r} written after all {len(self.plan)} planned "
                "tensors."
            )
        planned_name, shape, dtype = self.plan[self._next]
        if name != planned_name:
            raise CheckpointError(
                f"{self.directory}: expected tensor {planned_name!r} (number {self._next + 1} of "
                f"the plan) but got {name!r}; tensors must be written in plan order."
            )
        if tuple(tensor.shape) != shape:
            raise ShapeMismatchError(
                f"{self.directory}: tensor {name!r} has shape {list(tensor.shape)} but the plan "
                f"says {list(shape)}."
            )
        if tensor.dtype != dtype:
            raise CheckpointError(
                f"{self.directory}: tensor {name!r} has dtype {tensor.dtype} but the plan says "
                f"{dtype}; cast it before writing."
            )
        shard = self._shard_of[self._next]
        stream = self._stream if shard == self._stream_shard else self._open_shard(shard)
        assert stream is not None
        _write_tensor_bytes(stream, tensor)
        self._next += 1

    def close(self) -> None:
        """Finish: check every planned tensor was written, close files, write the index."""
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        if self._next < len(self.plan):
            missing = len(self.plan) - self._next
            raise CheckpointError(
                f"{self.directory}: {missing} planned tensors were never written, starting with "
                f"{self.plan[self._next][0]!r}; the output is incomplete."
            )
        if not self.plan:
            self._open_shard(0)  # an empty but valid model.safetensors
            self._stream.close()  # type: ignore[union-attr]
            self._stream = None
        if len(self.shard_files) > 1:
            index = {
                "metadata": {"total_size": self.total_size},
                "weight_map": {
                    name: self.shard_files[self._shard_of[i]].name
                    for i, (name, _, _) in enumerate(self.plan)
                },
            }
            (self.directory / SAFETENSORS_INDEX).write_text(
                json.dumps(index, indent=2) + "\n", encoding="utf-8"
            )

    def abort(self) -> None:
        """Close open files without finishing (the caller discards the directory)."""
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    def __enter__(self) -> StreamingShardWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


@contextlib.contextmanager
def atomic_directory(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``out`` to fill; rename it to ``out`` only on success.

    On any exception the temporary directory is removed and the exception re-raised. With
    ``overwrite``, an existing ``out`` is moved aside, replaced, then deleted.
    """
    out = Path(out).expanduser().absolute()
    if out.exists() and not overwrite:
        raise CheckpointError(
            f"{out}: output already exists; choose another output or pass --force to replace it."
        )
    if out.exists() or out.is_symlink():
        _check_replaceable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.parent / f".{out.name}.mergearena-tmp-{secrets.token_hex(4)}"
    temporary.mkdir()
    try:
        yield temporary
        _move_into_place(temporary, out, overwrite)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def _check_replaceable(out: Path) -> None:
    """Refuse to replace what is surely not a previous output: a file, home, or the cwd's tree."""
    if out.is_file():
        raise CheckpointError(f"{out}: is a file, not an output directory; refusing to replace it.")
    real = out.resolve()
    protected = {Path.home().resolve(), *Path.cwd().resolve().parents, Path.cwd().resolve()}
    if real in protected:
        raise CheckpointError(
            f"{out}: is the home directory or contains the working directory; refusing to replace "
            "it even with --force. Choose a dedicated output directory."
        )


def _move_into_place(temporary: Path, out: Path, overwrite: bool) -> None:
    if not out.exists() and not out.is_symlink():
        os.rename(temporary, out)
        return
    if not overwrite:
        raise CheckpointError(
            f"{out}: appeared while the output was being written; nothing was replaced. Choose "
            "another output or pass --force."
        )
    old = out.parent / f".{out.name}.mergearena-old-{secrets.token_hex(4)}"
    os.rename(out, old)
    try:
        os.rename(temporary, out)
    except BaseException:
        os.rename(old, out)  # put the previous output back
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)


def copy_support_files(
    source_dir: str | Path, out_dir: str | Path, *, config: bool = True, tokenizer: bool = True
) -> list[Path]:
    """Copy the config, generation config and tokenizer files that exist; return the copies."""
    source_dir, out_dir = Path(source_dir), Path(out_dir)
    names = (CONFIG_FILES if config else ()) + (TOKENIZER_FILES if tokenizer else ())
    copied: list[Path] = []
    for name in names:
        source = source_dir / name
        if source.is_file():
            out_dir.mkdir(parents=True, exist_ok=True)
            copied.append(Path(shutil.copy2(source, out_dir / name)))
    return copied
