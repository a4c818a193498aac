"""A job's work area: the one folder its sandbox may write, capped in size.

The private tmpfs dirs of the sandbox are small; the work area holds the merged model, so it
must take many gigabytes, and no more than the competition's models need: a job that writes
until the disk is full must fail alone, not take the host's disk (the database, the uploads,
the other jobs) with it. A cgroup does not cap disk; a file system of the job's own does. Where
the worker runs as root, in order of preference:

- ``ext4``: a sparse file formatted ext4 and loop-mounted. Disk-backed, the best for large
  merges (an 8B model in bf16 is 16 GB): it takes host disk only as the job writes, up to the
  cap. Formatting is instant: no journal (nothing in it outlives the job), inode tables left
  for the kernel to read as zeros (``noinit_itable``), no reserved blocks.
- ``tmpfs``: where ``mkfs.ext4`` or a loop device is missing, a tmpfs of the cap's size. Its
  files live in RAM (and count toward the job's cgroup memory, where there is one).

Both are mounted ``nosuid,nodev``, read after the run by the worker, then unmounted in a
``finally`` (a lazy unmount as the last resort: a mount still busy is detached at once and
freed when its last user lets go), and the image is removed with the job's folder. A worker
killed mid-job runs no ``finally``: the next worker to start on the host unmounts and removes
what it left (``remove_abandoned_jobs``; a job folder's name holds its worker's pid). Not root,
nothing can be mounted: the work area is a plain folder, and the job's log says it is not
capped, and why.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

BYTES_PER_PARAMETER = 4  # the merged model as the runner saves it: float32 at the most
ROOM_BYTES = 4 * 2**30  # beside the model: the submission, tokenizer files, predictions, caches
DEFAULT_BYTES = 64 * 2**30  # a competition without a parameter limit
FULL_MARGIN_BYTES = 4 * 2**20  # a failed run that left less than this free ran out of room
_MOUNT_OPTIONS = "nosuid,nodev"
JOB_PREFIX = "mergearena-job-"  # a job folder: mergearena-job-<submission>-w<worker pid>-<random>
_JOB_FOLDER = re.compile(re.escape(JOB_PREFIX) + r"\d+-w(?P<pid>\d+)-")


def work_area_bytes(max_parameters: int | None) -> int:
    """The cap of a job's work area: room for the largest merged model the competition admits
    (``max_parameters`` at ``BYTES_PER_PARAMETER``) plus ``ROOM_BYTES``; ``DEFAULT_BYTES``
    where it sets no parameter limit."""
    if max_parameters is None:
        return DEFAULT_BYTES
    return max_parameters * BYTES_PER_PARAMETER + ROOM_BYTES


@dataclass(frozen=True)
class WorkArea:
    path: Path
    size_bytes: int | None  # None: not capped
    description: str  # one line for the job's log: its size and what holds it, or why no cap

    def is_full(self) -> bool:
        """Whether the area has (next to) no room left: what made a run that failed fail."""
        if self.size_bytes is None:
            return False
        status = os.statvfs(self.path)
        return status.f_bavail * status.f_frsize < FULL_MARGIN_BYTES

    def full_message(self) -> str:
        return f"the job's work area of {_gib(self.size_bytes)} is full"


def _gib(size: int | None) -> str:
    return "no limit" if size is None else f"{size / 2**30:g} GiB"


@contextlib.contextmanager
def work_area(path: Path, size_bytes: int) -> Iterator[WorkArea]:
    """Create ``path`` as a work area of at most ``size_bytes``, mounted until the block ends."""
    path.mkdir()
    if os.geteuid() != 0:
        yield WorkArea(
            path,
            None,
            f"work area: not capped (a file system of its own needs root to mount; this worker "
            f"runs as uid {os.geteuid()}): a job can fill the disk of {path.parent}",
        )
        return
    image = path.with_name(f"{path.name}.ext4")
    try:
        area = _mount_ext4(path, image, size_bytes)
        yield area if isinstance(area, WorkArea) else _mount_tmpfs(path, size_bytes, area)
    finally:
        unmount(path)
        image.unlink(missing_ok=True)


def _mount_ext4(path: Path, image: Path, size_bytes: int) -> WorkArea | str:
    """A sparse ext4 image loop-mounted at ``path``, or why it cannot be made."""
    if shutil.which("mkfs.ext4") is None:
        return "mkfs.ext4 is missing (apt-get install e2fsprogs)"
    with image.open("wb") as handle:
        handle.truncate(size_bytes)  # sparse: disk is taken only as the job writes
    make = ["mkfs.ext4", "-q", "-F", "-m", "0", "-O", "^has_journal"]
    make += ["-E", "lazy_itable_init=1,nodiscard", str(image)]
    mount = ["mount", "-o", f"loop,{_MOUNT_OPTIONS},noinit_itable", str(image), str(path)]
    for command in (make, mount):
        problem = _run(command)
        if problem is not None:
            image.unlink()
            return problem
    (path / "lost+found").rmdir()  # fsck's, of no use to a job
    where = "a loop-mounted ext4 image (disk)"
    return WorkArea(path, size_bytes, f"work area: {_gib(size_bytes)}, {where}")


def _mount_tmpfs(path: Path, size_bytes: int, no_disk: str) -> WorkArea:
    """A tmpfs of ``size_bytes`` at ``path``; ``no_disk`` says why not a disk image."""
    problem = _run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_bytes},{_MOUNT_OPTIONS}", "tmpfs", str(path)]
    )
    if problem is not None:
        return WorkArea(
            path,
            None,
            f"work area: not capped (no disk image: {no_disk}; no tmpfs: {problem}): a job can "
            f"fill the disk of {path.parent}",
        )
    where = f"a tmpfs, in RAM (no disk image: {no_disk})"
    return WorkArea(path, size_bytes, f"work area: {_gib(size_bytes)}, {where}")


def _run(command: list[str]) -> str | None:
    """Run a mount tool; None if it worked, else what it said."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"{command[0]}: {error}"
    if done.returncode == 0:
        return None
    return f"{command[0]} exited with code {done.returncode}: {done.stderr.strip()}"


def unmount(path: Path) -> None:
    """Unmount whatever is mounted at ``path``; lazily if it is busy. A loop device set up by
    ``mount -o loop`` is freed with its mount (the autoclear flag)."""
    while os.path.ismount(path):
        if _run(["umount", str(path)]) is not None and _run(["umount", "--lazy", str(path)]):
            raise OSError(f"cannot unmount the work area at {path}: umount refused it")


def job_folder_prefix(submission_id: int) -> str:
    """The start of a job folder's name: the submission and this worker's pid."""
    return f"{JOB_PREFIX}{submission_id}-w{os.getpid()}-"


def remove_abandoned_jobs(scratch: Path) -> list[Path]:
    """Unmount and remove the job folders under ``scratch`` whose worker is no longer running
    (killed mid-job, it ran no ``finally``); returns them. Folders of running workers, this
    one's included, are left alone."""
    removed = []
    for folder in sorted(scratch.glob(f"{JOB_PREFIX}*")):
        match = _JOB_FOLDER.match(folder.name)
        if match is None or _is_running(int(match["pid"])) or not folder.is_dir():
            continue
        unmount(folder / "work")
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def _is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
