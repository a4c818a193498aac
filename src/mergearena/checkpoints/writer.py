"""Write checkpoints: streamed safetensors shards, atomic output directories, support files.

Every output tensor's name, shape and dtype is known before the first one is computed, so each
shard's header is written up front and each tensor's bytes go to their known place as they arrive:
memory stays at the tensors being written. The whole output is built in a hidden sibling directory
and renamed into place only when complete, so an interrupted merge never leaves something that
looks like a finished model.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import secrets
import shutil
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType

import torch

from mergearena.checkpoints.reader import (
    SAFETENSORS_FILE,
    SAFETENSORS_INDEX,
    TORCH_TO_SAFETENSORS_DTYPE,
)
from mergearena.errors import CheckpointError, ShapeMismatchError, shorten

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


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A CPU tensor's raw little-endian bytes (any dtype, bf16 included), without a copy when it
    is contiguous."""
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data


def _pwrite_all(descriptor: int, data: memoryview, offset: int) -> int:
    """Write all of ``data`` at ``offset``; returns the offset after it."""
    while data:
        written = os.pwrite(descriptor, data, offset)
        data, offset = data[written:], offset + written
    return offset


class StreamingShardWriter:
    """Write ``plan`` (name, shape, dtype per tensor) as safetensors shards.

    Tensors go to shards in plan order, starting a new shard when the next tensor would push the
    current one past ``max_shard_bytes``. One shard is named ``model.safetensors``; several are
    ``model-0000i-of-0000N.safetensors`` with a ``model.safetensors.index.json``. Every header is
    known from the plan, so each tensor's place in its file is too: tensors may be written in any
    order, from several threads at once, each exactly once.
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
        self._index = {name: index for index, (name, _, _) in enumerate(self.plan)}
        if len(self._index) != len(self.plan):
            names = [name for name, _, _ in self.plan]
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
        self._shards = shards
        self._shard_of = {index: s for s, indices in enumerate(shards) for index in indices}
        self._headers = [self._header(shard) for shard in range(len(shards))]
        self._position: dict[int, int] = {}  # plan index -> its bytes' offset in its file
        for shard, indices in enumerate(shards):
            position = len(self._headers[shard])
            for index in indices:
                self._position[index] = position
                _, shape, dtype = self.plan[index]
                position += math.prod(shape) * dtype.itemsize
        self._descriptors: dict[int, int] = {}
        self._written: set[int] = set()
        self._lock = threading.Lock()
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

    def _descriptor(self, shard: int) -> int:
        """The shard's file, created with its header on first use (call with the lock held)."""
        descriptor = self._descriptors.get(shard)
        if descriptor is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(
                self.shard_files[shard], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666
            )
            self._descriptors[shard] = descriptor
            _pwrite_all(descriptor, memoryview(self._headers[shard]), 0)
        return descriptor

    def write(
        self,
        name: str,
        tensor: torch.Tensor,
        download: Callable[[torch.Tensor, Callable[[memoryview], object]], None] | None = None,
    ) -> None:
        """Write one tensor of the plan, in its place; its shape and dtype must match the plan.

        A tensor on a GPU comes to the CPU whole (``.cpu()``), unless ``download`` passes its
        bytes to the file a chunk at a time (``Stager.download``).
        """
        index = self._index.get(name)
        if index is None:
            raise CheckpointError(
                f"{self.directory}: tensor {name!r} is not in the write plan ({len(self.plan)} "
                "tensors)."
            )
        _, shape, dtype = self.plan[index]
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
        with self._lock:
            if index in self._written:
                raise CheckpointError(f"{self.directory}: tensor {name!r} was written twice.")
            self._written.add(index)
            descriptor = self._descriptor(self._shard_of[index])
        position = self._position[index]

        def sink(data: memoryview) -> None:
            nonlocal position
            position = _pwrite_all(descriptor, data, position)

        if download is not None and tensor.device.type != "cpu":
            download(tensor, sink)
        else:
            sink(_tensor_bytes(tensor.cpu()))

    def _close_files(self) -> None:
        with self._lock:
            for descriptor in self._descriptors.values():
                os.close(descriptor)
            self._descriptors.clear()

    def close(self) -> None:
        """Finish: check every planned tensor was written, close files, write the index."""
        self._close_files()
        missing = [
            name for index, (name, _, _) in enumerate(self.plan) if index not in self._written
        ]
        if missing:
            raise CheckpointError(
                f"{self.directory}: {len(missing)} planned tensors were never written, starting "
                f"with {missing[0]!r}; the output is incomplete."
            )
        if not self.plan:
            with self._lock:
                self._descriptor(0)  # an empty but valid model.safetensors
            self._close_files()
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
        self._close_files()

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


def write_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to a temporary sibling of ``path``, then rename it into place: a reader
    (or a crash) sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        temporary.write_bytes(data)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def check_output_location(out: str | Path, overwrite: bool = False) -> None:
    """Refuse, before any work, an output directory that cannot be written or must not be
    replaced: it exists (without ``overwrite``), is a file, the home directory or holds the
    working directory, or the directory it would be made in is a file or not writable."""
    out = Path(out).expanduser().absolute()
    try:
        if out.exists() and not overwrite:
            raise CheckpointError(
                f"{out}: output already exists; choose another output or pass --force to "
                "replace it."
            )
        if out.exists() or out.is_symlink():
            _check_replaceable(out)
        parent = _nearest_existing(out.parent)
        if not parent.is_dir():
            raise CheckpointError(
                f"{out}: cannot be created, because {parent} is a file, not a directory; choose "
                "another output."
            )
        if not os.access(parent, os.W_OK | os.X_OK):
            raise CheckpointError(
                f"{out}: cannot be created: {parent} is not writable by this user (or is on a "
                "read-only file system); choose another output."
            )
    except OSError as error:  # a name too long for the file system, typically
        raise CheckpointError(_write_error_message(out, error)) from None


def _write_error_message(out: Path, error: OSError, *, kept: bool = False) -> str:
    """What an ``OSError`` while making ``out`` means to a user, and what to do; ``kept``: a
    previous output at ``out`` is still there, untouched."""
    at = "" if error.filename is None else f" at {shorten(str(error.filename))}"
    out = Path(shorten(str(out)))
    kept_note = " The previous output there is untouched." if kept else ""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return (
            f"{out}: the disk is full ({error.strerror}{at}); nothing was written.{kept_note} Free "
            f"space on the disk holding {out.parent}, or choose an output on another disk."
        )
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return (
            f"{out}: not allowed to write there ({error.strerror}{at}); nothing was written."
            f"{kept_note} Choose an output this user can write."
        )
    return (
        f"{out}: cannot write it ({error.strerror or error}{at}); nothing was written.{kept_note}"
    )


@contextlib.contextmanager
def atomic_directory(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``out`` to fill; rename it to ``out`` only on success.

    On any exception the temporary directory is removed and the exception re-raised, an
    ``OSError`` (a full disk, a read-only place) as a :class:`CheckpointError` that says so.
    With ``overwrite``, an existing ``out`` is moved aside, replaced, then deleted. Processes
    that finish writing the same ``out`` at once take turns (see ``_move_into_place``): each
    leaves a complete output or an error, never a mix.
    """
    out = Path(out).expanduser().absolute()
    check_output_location(out, overwrite)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        # The process id keeps concurrent writers' names apart, and says whose a stray one was.
        temporary = out.parent / f".{out.name}.mergearena-tmp-{os.getpid()}-{secrets.token_hex(4)}"
        temporary.mkdir()
    except OSError as error:
        raise CheckpointError(_write_error_message(out, error)) from None
    try:
        yield temporary
        _move_into_place(temporary, out, overwrite)
    except BaseException as error:
        shutil.rmtree(temporary, ignore_errors=True)
        if isinstance(error, OSError):
            message = _write_error_message(out, error, kept=out.exists())
            raise CheckpointError(message) from error
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


@contextlib.contextmanager
def _parent_locked(out: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``out``'s parent directory: writers of outputs there take
    turns to check and rename (milliseconds each). The kernel drops the lock if the process
    dies, so a crash never leaves a stale lock, and no lock file is left behind."""
    descriptor = os.open(out.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # releases the lock


def _appeared(out: Path) -> CheckpointError:
    return CheckpointError(
        f"{out}: appeared while this output was being written (another merge wrote it at the "
        "same time?); nothing was replaced. Pass --force to replace it, or choose another output."
    )


def _move_into_place(temporary: Path, out: Path, overwrite: bool) -> None:
    with _parent_locked(out):
        if not out.exists() and not out.is_symlink():
            try:
                os.rename(temporary, out)
            except OSError as error:  # made by a process that does not take the lock
                if error.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                    raise _appeared(out) from None
                raise
            return
        if not overwrite:
            raise _appeared(out)
        _check_replaceable(out)  # again: what appeared meanwhile may be a file
        old = out.parent / f".{out.name}.mergearena-old-{os.getpid()}-{secrets.token_hex(4)}"
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
