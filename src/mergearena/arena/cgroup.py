"""cgroup v2 limits on a job as a whole: its processes' memory together, and how many tasks
(processes and threads) it may have at once. rlimits bound each process; these bound the tree.

They apply only where the machine delegates a cgroup v2 subtree to the worker: ``/sys/fs/cgroup``
is cgroup v2, the worker's own cgroup (``0::/path`` in ``/proc/self/cgroup``) is writable, and
the ``memory`` and ``pids`` controllers are available in it (systemd gives this to a service with
``Delegate=yes``; a container runtime, to a container with a private cgroup). Then::

    OWN/                       memory and pids enabled in its cgroup.subtree_control
    OWN/mergearena-worker/     the worker itself, moved there once if OWN held it
    OWN/job-<pid>-<hex>/       one per run: memory.max, memory.swap.max 0, memory.oom.group 1,
                               pids.max; the run's first process joins it before it can fork,
                               and it is removed once everything in it is dead

The move is needed because cgroup v2 enables controllers for a cgroup's children only while the
cgroup itself holds no processes (the root cgroup excepted). If OWN holds other processes too,
the worker does not move them: it says why no cgroup limits hold, and runs without them.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import secrets
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
WORKER_CGROUP = "mergearena-worker"  # where the worker moves itself, out of OWN
JOB_PREFIX = "job-"
CONTROLLERS = ("memory", "pids")
_REMOVE_SECONDS = 10.0  # how long a job's killed processes may take to leave its cgroup
_POLL_SECONDS = 0.02


class CgroupUnusable(Exception):
    """Why job cgroups cannot be made here: a clause for the job's log."""


@dataclass(frozen=True)
class CgroupUsage:
    """What a job's cgroup recorded, read after its processes are dead."""

    peak_memory_bytes: int | None  # memory.peak (kernel 5.19+): all its processes together
    oom_kills: int  # memory.events oom_kill: processes killed at memory.max
    refused_forks: int  # pids.events max: forks and threads refused at pids.max


@functools.cache
def job_cgroup_parent() -> tuple[Path | None, str | None]:
    """The cgroup job cgroups go under and None, or None and why there is none. Prepares it
    once per process (see ``delegated_parent``)."""
    try:
        parent = delegated_parent(
            CGROUP_ROOT,
            mounts=Path("/proc/self/mounts").read_text(),
            self_cgroup=Path("/proc/self/cgroup").read_text(),
            pid=os.getpid(),
        )
    except CgroupUnusable as error:
        return None, str(error)
    except OSError as error:
        return None, f"cannot read this process's cgroup ({error})"
    return parent, None


def delegated_parent(root: Path, *, mounts: str, self_cgroup: str, pid: int) -> Path:
    """Make the cgroup of process ``pid`` (in the hierarchy mounted at ``root``) a parent for
    job cgroups and return it, or raise ``CgroupUnusable`` saying why it cannot be one.

    ``mounts`` and ``self_cgroup`` are the texts of ``/proc/self/mounts`` and
    ``/proc/self/cgroup``. If the cgroup holds ``pid`` (and nothing else) and is not the root,
    ``pid`` moves to ``WORKER_CGROUP`` below it; then ``+memory +pids`` are enabled for its
    children. A process already moved there by an earlier call is seen as in the parent.
    """
    mount_types = [
        fields[2]
        for line in mounts.splitlines()
        if len(fields := line.split()) > 2 and fields[1] == str(root)
    ]
    if not mount_types:
        raise CgroupUnusable(f"{root} is not mounted")
    if mount_types[-1] != "cgroup2":  # the last mount at a path hides the others
        version = "cgroup v1" if mount_types[-1] in ("tmpfs", "cgroup") else mount_types[-1]
        raise CgroupUnusable(f"{root} is {version}, not cgroup v2")
    own = next((line[3:] for line in self_cgroup.splitlines() if line.startswith("0::")), None)
    if own is None:
        raise CgroupUnusable("this process is in no cgroup v2 hierarchy (/proc/self/cgroup)")
    directory = root / own.lstrip("/")
    if directory.name == WORKER_CGROUP and _has_controllers(directory.parent, "subtree_control"):
        return directory.parent
    where = f"the worker's cgroup {own}"
    if not (os.access(directory, os.W_OK) and os.access(directory / "cgroup.procs", os.W_OK)):
        raise CgroupUnusable(
            f"{where} is not writable by uid {os.geteuid()}: the machine delegates no cgroup "
            "to the worker (systemd: run it as a service with Delegate=yes)"
        )
    available = _words(directory / "cgroup.controllers")
    missing = [name for name in CONTROLLERS if name not in available]
    if missing:
        raise CgroupUnusable(
            f"{where} lacks the controllers {', '.join(missing)} (the cgroup above must enable "
            "them for it; systemd: Delegate=yes)"
        )
    try:
        if not _has_controllers(directory, "subtree_control"):
            processes = _pids(directory / "cgroup.procs")
            is_root = not (directory / "cgroup.type").exists()  # only the root lacks the file
            if processes and not is_root:
                others = sorted(processes - {pid})
                if others:
                    raise CgroupUnusable(
                        f"{where} holds other processes too (pids {_short_list(others)}), and "
                        "cgroup v2 enables controllers only below a cgroup with no processes of "
                        "its own: start the worker in a cgroup of its own (systemd-run --scope "
                        "-p Delegate=yes ...)"
                    )
                (directory / WORKER_CGROUP).mkdir(exist_ok=True)
                _write(directory / WORKER_CGROUP / "cgroup.procs", str(pid))
            _write(directory / "cgroup.subtree_control", " ".join(f"+{c}" for c in CONTROLLERS))
        _remove_stale_jobs(directory)
    except OSError as error:
        raise CgroupUnusable(f"cannot prepare {where} for job cgroups ({error})") from error
    return directory


@contextlib.contextmanager
def job_cgroup(parent: Path, *, memory_bytes: int | None, tasks: int) -> Iterator[Path]:
    """A new cgroup for one run under ``parent``, with its limits set; whatever is in it at the
    end is killed, and it is removed, also on error."""
    job = parent / f"{JOB_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
    job.mkdir()
    try:
        set_limits(job, memory_bytes=memory_bytes, tasks=tasks)
        yield job
    finally:
        remove_job_cgroup(job)


def set_limits(job: Path, *, memory_bytes: int | None, tasks: int) -> None:
    """``memory.max`` (None: none) with no swap to escape to, ``pids.max``; at ``memory.max`` the
    OOM killer takes the whole job (``memory.oom.group``), not one process of it."""
    _write(job / "memory.max", "max" if memory_bytes is None else str(memory_bytes))
    _write(job / "pids.max", str(tasks))
    for name, value in (("memory.swap.max", "0"), ("memory.oom.group", "1")):
        if (job / name).exists():  # swap accounting and group kills are kernel options
            _write(job / name, value)


def join(job: Path) -> None:
    """Move the calling process into ``job``: run in the child between fork and exec, so that
    everything it starts is inside."""
    descriptor = os.open(job / "cgroup.procs", os.O_WRONLY)
    try:
        os.write(descriptor, b"0")  # 0: the writer itself
    finally:
        os.close(descriptor)


def kill_processes(job: Path) -> None:
    """SIGKILL everything in ``job``: with ``cgroup.kill`` (kernel 5.14+) at once, forks under
    way included; else each process listed now."""
    if (job / "cgroup.kill").exists():
        _write(job / "cgroup.kill", "1")
        return
    for pid in _pids(job / "cgroup.procs"):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def read_usage(job: Path) -> CgroupUsage:
    peak = job / "memory.peak"
    return CgroupUsage(
        peak_memory_bytes=int(peak.read_text()) if peak.exists() else None,
        oom_kills=_counts(job / "memory.events").get("oom_kill", 0),
        refused_forks=_counts(job / "pids.events").get("max", 0),
    )


def remove_job_cgroup(job: Path) -> None:
    """Kill what is left in ``job`` and remove it, once its processes are gone (they leave as
    they exit, which takes a moment after SIGKILL). One that outlives the wait is reported on
    stderr and left for the next worker start (``delegated_parent``)."""
    deadline = time.monotonic() + _REMOVE_SECONDS
    while True:
        try:
            kill_processes(job)
            job.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as error:
            if error.errno != errno.EBUSY or time.monotonic() > deadline:
                print(f"sandbox: cannot remove cgroup {job} ({error})", file=sys.stderr, flush=True)
                return
        time.sleep(_POLL_SECONDS)


def _remove_stale_jobs(parent: Path) -> None:
    """Remove job cgroups left by worker processes that died mid-run; rmdir fails, harmlessly,
    on one that still holds processes."""
    for job in parent.glob(f"{JOB_PREFIX}*"):
        worker_pid = job.name.removeprefix(JOB_PREFIX).split("-")[0]
        if worker_pid.isdigit() and not _is_running(int(worker_pid)):
            with contextlib.suppress(OSError):
                job.rmdir()


def _is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    return True


def _has_controllers(directory: Path, kind: str) -> bool:
    return set(CONTROLLERS) <= _words(directory / f"cgroup.{kind}")


def _words(path: Path) -> set[str]:
    """The words of a cgroup list file (a written "+memory" reads back as "memory")."""
    try:
        return {word.lstrip("+") for word in path.read_text().split()}
    except FileNotFoundError:
        return set()


def _pids(path: Path) -> set[int]:
    return {int(word) for word in path.read_text().split()}


def _counts(path: Path) -> dict[str, int]:
    """A flat-keyed cgroup file ("oom_kill 1" lines) as a dict; {} if the file is missing."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return {}
    return {key: int(value) for key, value in (line.split() for line in lines if line.strip())}


def _write(path: Path, text: str) -> None:
    with open(path, "w") as handle:
        handle.write(text)


def _short_list(numbers: list[int], shown: int = 5) -> str:
    more = f" and {len(numbers) - shown} more" if len(numbers) > shown else ""
    return ", ".join(map(str, numbers[:shown])) + more
