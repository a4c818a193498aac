"""Extract an uploaded submission archive (.tar, .tar.gz/.tgz, .zip) without trusting it.

The archive is read as a stream and every member is written by us, never by ``extractall``: only
regular files and directories are accepted, each at a relative path without ``..``, as a fresh
file (mode 0o644) or directory (0o755). Links, devices and FIFOs are refused outright: a link
inside the submission is never needed and is the classic way out of the destination. Sizes are
counted as bytes are actually written, not taken from headers, and the decompressed tar stream
itself is capped, so a gzip bomb (or a huge pax header) stops at the limit. Everything is built in
a hidden sibling of the destination and renamed into place only when complete (see
``atomic_directory``), so a refused archive leaves nothing behind.
"""

from __future__ import annotations

import gzip
import os
import stat
import tarfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Protocol

from mergearena.checkpoints.writer import atomic_directory
from mergearena.errors import SubmissionError

_CHUNK = 1 << 20
# What tar adds around each member besides its data: a 512-byte header, padding to 512 bytes, and
# room for pax or GNU long-name headers. The decompressed stream may exceed max_bytes by this much
# per member before it is cut off.
_TAR_OVERHEAD_PER_MEMBER = 8 * 1024
# Reading these exceptions means the archive itself is broken (bad header, truncated, bad CRC).
_CORRUPT = (tarfile.TarError, zipfile.BadZipFile, gzip.BadGzipFile, zlib.error, EOFError)
_HOW_TO_PACK = "create it with `tar czf submission.tar.gz -C <your directory> .`"


class _Readable(Protocol):
    """All a tar stream or a member's data is read through: the raw file, a gzip decompressor
    or a member's reader, which share no base class but ``read``."""

    def read(self, size: int = -1, /) -> bytes: ...


def extract_archive(
    archive: Path,
    dest: Path,
    *,
    max_files: int = 2000,
    max_bytes: int = 64 * 2**20,
    max_member_bytes: int | None = None,
) -> list[Path]:
    """Extract ``archive`` into the new directory ``dest``; return the files written, in order.

    Raises ``SubmissionError`` naming the member and the fix for: an absolute path or a ``..``
    component, a link (symbolic or hard), a device file or FIFO, a name used twice, more than
    ``max_files`` members, more than ``max_bytes`` in all (or ``max_member_bytes`` in one file)
    once uncompressed, an encrypted zip member, or a corrupt or unrecognised archive.
    """
    archive, dest = Path(archive), Path(dest)
    if dest.exists() or dest.is_symlink():
        raise SubmissionError(f"{dest}: already exists; extract into a directory that does not.")
    with archive.open("rb") as raw:
        magic = raw.read(4)
        raw.seek(0)
        with atomic_directory(dest) as staging:
            extraction = _Extraction(archive.name, staging, max_files, max_bytes, max_member_bytes)
            try:
                if magic in (b"PK\x03\x04", b"PK\x05\x06"):  # a zip, or an empty zip
                    _extract_zip(raw, extraction)
                else:
                    gzipped = magic.startswith(b"\x1f\x8b")
                    _extract_tar(gzip.GzipFile(fileobj=raw) if gzipped else raw, extraction)
            except _CORRUPT as error:
                where = f" near member {extraction.last!r}" if extraction.last else ""
                raise SubmissionError(
                    f"{archive.name}: not a readable .tar, .tar.gz or .zip archive{where} "
                    f"({error}); it is corrupt, truncated or another format: {_HOW_TO_PACK}, "
                    "and upload it again."
                ) from None
    return [dest / relative for relative in extraction.files]


@dataclass
class _Extraction:
    """The members written so far and what is left of the limits; one instance per archive."""

    archive: str
    root: Path
    max_files: int
    max_bytes: int
    max_member_bytes: int | None
    members: int = 0
    written: int = 0
    last: str = ""
    files: list[PurePosixPath] = field(default_factory=list)
    kinds: dict[PurePosixPath, str] = field(default_factory=dict)  # path -> "file" | "directory"

    def refuse(self, name: str, problem: str, fix: str) -> SubmissionError:
        return SubmissionError(f"{self.archive}: member {name!r} {problem}; {fix}.")

    def count(self, name: str) -> None:
        self.last = name
        self.members += 1
        if self.members > self.max_files:
            raise self.too_many(name)

    def too_many(self, name: str) -> SubmissionError:
        return SubmissionError(
            f"{self.archive}: has more than {self.max_files} members (stopped at {name!r}); "
            "leave out caches, checkpoints and data the submission does not need."
        )

    def path(self, name: str, kind: str) -> PurePosixPath | None:
        """The member's checked path relative to the root; None for the root itself ('./')."""
        if name.startswith("/"):
            raise self.refuse(
                name, "has an absolute path", f"paths must be relative: {_HOW_TO_PACK}"
            )
        if "\\" in name or "\0" in name:
            raise self.refuse(name, "has a backslash or NUL in its name", "use plain / paths")
        parts = [part for part in name.split("/") if part not in ("", ".")]
        if ".." in parts:
            raise self.refuse(
                name, "has a '..' component", f"paths must stay inside: {_HOW_TO_PACK}"
            )
        if not parts:
            return None
        relative = PurePosixPath(*parts)
        for parent in list(relative.parents)[:-1]:
            if self.kinds.get(parent) == "file":
                raise self.refuse(
                    name, f"lies under {str(parent)!r}, which is a file", "rename one"
                )
        if relative in self.kinds and (kind, self.kinds[relative]) != ("directory", "directory"):
            raise self.refuse(
                name, "appears twice in the archive (or as both file and directory)", "keep one"
            )
        return relative

    def add_directory(self, name: str) -> None:
        relative = self.path(name, "directory")
        if relative is not None:
            self._make_directories(relative, name)

    def add_file(self, name: str, source: _Readable, declared_size: int) -> None:
        """Copy ``source`` to a new file, counting the bytes really written against the limits."""
        relative = self.path(name, "file")
        if relative is None:
            raise self.refuse(
                name, "is a file without a name", f"re-create the archive: {_HOW_TO_PACK}"
            )
        self._check_size(name, declared_size, declared_size)  # refuse early when the header says so
        self._make_directories(relative.parent, name)
        target = self.root.joinpath(*relative.parts)
        # O_EXCL | O_NOFOLLOW: never write through anything already there (nothing should be).
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
        try:
            descriptor = os.open(target, flags, 0o644)
        except OSError as error:  # a name too long for this file system, typically
            raise self.refuse(name, f"cannot be created ({error.strerror})", "shorten it") from None
        os.fchmod(descriptor, 0o644)  # whatever the umask
        self.kinds[relative] = "file"
        self.files.append(relative)
        member_bytes = 0
        with open(descriptor, "wb") as out:
            while chunk := source.read(_CHUNK):
                member_bytes += len(chunk)
                self._check_size(name, member_bytes, len(chunk))
                self.written += len(chunk)
                out.write(chunk)

    def _check_size(self, name: str, member_bytes: int, more_bytes: int) -> None:
        if self.max_member_bytes is not None and member_bytes > self.max_member_bytes:
            raise self.refuse(
                name,
                f"is larger than the limit of {self.max_member_bytes} bytes per file",
                "leave large files out of the submission",
            )
        if self.written + more_bytes > self.max_bytes:
            raise self.refuse(
                name,
                f"takes the archive past the limit of {self.max_bytes} bytes uncompressed",
                "leave caches, checkpoints and data the submission does not need out of it",
            )

    def _make_directories(self, relative: PurePosixPath, name: str) -> None:
        current = self.root
        for depth, part in enumerate(relative.parts):
            current = current / part
            key = PurePosixPath(*relative.parts[: depth + 1])
            if key not in self.kinds:
                try:
                    current.mkdir()
                except OSError as error:  # a name too long for this file system, typically
                    message = f"cannot be created ({error.strerror})"
                    raise self.refuse(name, message, "shorten it") from None
                current.chmod(0o755)  # whatever the umask
                self.kinds[key] = "directory"


class _CappedReader:
    """A read-only stream that raises once more than ``limit`` bytes have been read from it.

    Requests are shrunk to what is left, so even a single huge read (tarfile reads a pax header
    in one call) never asks the decompressor for more than the limit.
    """

    def __init__(self, stream: _Readable, limit: int, archive: str) -> None:
        self.stream, self.left, self.archive = stream, limit, archive
        self.limit = limit

    def read(self, size: int = -1) -> bytes:
        wanted = self.left + 1 if size < 0 else min(size, self.left + 1)
        data = self.stream.read(wanted)
        self.left -= len(data)
        if self.left < 0:
            raise SubmissionError(
                f"{self.archive}: decompresses to more than {self.limit} bytes of tar data; "
                "leave caches, checkpoints and data the submission does not need out of it."
            )
        return data


def _extract_tar(decompressed: _Readable, extraction: _Extraction) -> None:
    limit = extraction.max_bytes + (extraction.max_files + 2) * _TAR_OVERHEAD_PER_MEMBER
    stream = _CappedReader(decompressed, limit, extraction.archive)
    # "r|": a single forward pass that never seeks, so the cap above sees every byte.
    with tarfile.open(fileobj=stream, mode="r|") as tar:  # type: ignore[call-overload]
        for member in tar:
            extraction.count(member.name)
            if member.issym() or member.islnk():
                raise extraction.refuse(
                    member.name,
                    f"is a {'symbolic' if member.issym() else 'hard'} link to {member.linkname!r} "
                    "and links are not accepted",
                    "store the file itself (tar --dereference --hard-dereference)",
                )
            if member.isdir():
                extraction.add_directory(member.name)
            elif member.isreg():
                source = tar.extractfile(member)
                assert source is not None  # a regular file always has a reader
                extraction.add_file(member.name, source, member.size)
            else:
                raise extraction.refuse(
                    member.name,
                    "is a device file, FIFO or other special file",
                    "submissions may hold only regular files and directories",
                )
    # Past the end-of-archive marker there should be only zero padding. Anything else means a
    # damaged header made tarfile stop early (it treats one as the end); reading to the end also
    # makes gzip check its CRC.
    while chunk := stream.read(_CHUNK):
        if chunk.strip(b"\0"):
            raise tarfile.ReadError("data after the end-of-archive marker")


def _extract_zip(raw: BinaryIO, extraction: _Extraction) -> None:
    with zipfile.ZipFile(raw) as archive:
        members = archive.infolist()
        if len(members) > extraction.max_files:  # the zip's directory is read already: say so now
            raise extraction.too_many(members[extraction.max_files].filename)
        for member in members:
            extraction.count(member.filename)
            mode = member.external_attr >> 16 if member.create_system == 3 else 0  # 3: Unix
            if stat.S_ISLNK(mode):
                raise extraction.refuse(
                    member.filename,
                    "is a symbolic link and links are not accepted",
                    "store the file itself (zip without --symlinks)",
                )
            if stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
                raise extraction.refuse(
                    member.filename,
                    "is a device file, FIFO or other special file",
                    "submissions may hold only regular files and directories",
                )
            if member.flag_bits & 0x1:
                raise extraction.refuse(
                    member.filename, "is encrypted", "upload an archive without a password"
                )
            if member.is_dir():
                extraction.add_directory(member.filename)
                continue
            try:
                source = archive.open(member)
            except NotImplementedError as error:  # e.g. an unsupported compression method
                raise extraction.refuse(
                    member.filename, f"cannot be read ({error})", "re-create the zip with deflate"
                ) from None
            with source:
                extraction.add_file(member.filename, source, member.file_size)
