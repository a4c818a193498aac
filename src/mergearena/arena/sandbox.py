"""Run an untrusted command with limits, inside a bubblewrap (``bwrap``) sandbox.

What the sandbox holds the command to:

- Files: a root of its own, an empty tmpfs (read-only once set up), holding only what is
  mounted into it. The system, read-only: ``/usr``, ``/bin``, ``/sbin``, ``/lib*`` and of
  ``/etc`` only the dynamic linker's cache and settings, ``passwd``, ``group``,
  ``nsswitch.conf``, the certificates and ``localtime`` (``SYSTEM_PATHS``); of ``/sys`` the
  CPU and NUMA node lists (all of ``/sys`` read-only when GPU device files are passed in, for
  the driver). A minimal ``/dev``, the pid namespace's own ``/proc``, and fresh empty tmpfs
  dirs at ``/tmp``, ``/var/tmp``, ``/root``, ``/home`` and ``/run`` (each at most
  ``Limits.private_dir_bytes``, since a tmpfs lives in RAM). Then what the caller gives:
  ``readonly`` paths, ``hidden`` paths (an empty tmpfs over a directory; over a file,
  /dev/null, which cannot be opened on a nodev mount) and one writable ``workdir``, each bound
  at its own path so paths in job files mean the same inside and out. A path is mounted after
  every path above it, so a path bound inside a hidden directory shows alone in it (one
  admitted model of a folder of models), and a hidden path inside a bound one stays hidden.
  Nothing else of the host is there: not its ``/``, its other users' files, ``/etc/shadow``,
  a model cache as a whole, the worker's data directory or the project's checkout. What a job
  gets is the worker's choice (``arena.worker``): the Python environment, the calibration
  files, each model its competition admits (``policy.model_mounts``) and its work folder.
- Network: a fresh network namespace holding only loopback, so nothing outside can be reached,
  the host's loopback services included.
- Processes: a fresh pid namespace. When the command exits or is killed, every process it
  started dies with it (the namespace's init is killed and the kernel kills the rest).
- Privileges: run as root, bwrap makes no user namespace (one mapping root to itself would leave
  the command owning every file of the host, ``/etc/shadow`` included) but drops to ``nobody``
  through ``setpriv``, with no capabilities and no_new_privs, before the command starts; the
  workdir is given to ``nobody`` so it can write there. ``readonly`` paths must be readable by
  ``nobody``; a directory on the way to one that ``nobody`` cannot enter (a 0700 ``mkdtemp``)
  is replaced by an empty tmpfs with only the bound paths inside. Run as another
  user, bwrap makes a user namespace and the command runs as that user.
- Resources (``Limits``), set with setrlimit on bwrap and inherited: per-process address space,
  CPU time and file size, core dumps off, and ``RLIMIT_NPROC``. The kernel counts processes per
  real uid and exempts root entirely: the process limit binds only because the command runs as
  ``nobody`` (or as the unprivileged service user, whose own processes then count too).
- Resources of the job as a whole (``mergearena.arena.cgroup``), where the machine delegates
  cgroup v2 to the worker: its processes' memory together (``memory.max``, no swap; at the limit
  the whole job is killed) and its processes and threads together (``pids.max``). The command
  joins its cgroup before it can fork, and everything still in it at the end is killed.
  Elsewhere the run goes on without them, and ``SandboxResult.confinement`` says why.

GPUs: ``/dev`` is minimal; the caller passes the device files a GPU run needs (``devices``; the
worker passes ``/dev/nvidia*`` when it runs on CUDA).

- System calls: a seccomp filter (``mergearena.arena.seccomp``) refuses sockets other than
  ``AF_UNIX``, new namespaces, tracing, mounts, keyrings, bpf, perf events and kernel modules,
  installed by bwrap just before the command starts. Where libseccomp cannot be loaded the run
  goes on without it, and ``SandboxResult.confinement`` (which the worker puts at the top of the
  job's log) says so.

What it does not do: limit CPU across processes (only each process's CPU time, and the wall
time of the whole); cap the size of the workdir (the worker makes each job's a file system of
its own: ``arena.workarea``). ``sandbox=False`` runs the same command with the same environment,
rlimits, cgroup limits, wall limit and output cap but none of the above: the command runs as the
caller (for root, ``RLIMIT_NPROC`` then does not bind) and sees everything; at the end, what
stays in its process group is killed, and with a cgroup everything it started.
"""

from __future__ import annotations

import contextlib
import functools
import os
import resource
import selectors
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from mergearena.arena import cgroup
from mergearena.arena.seccomp import seccomp_program
from mergearena.errors import ArenaError

SANDBOX_UID = 65534  # nobody (and gid nogroup): who a command runs as when the arena runs as root
PRIVATE_DIRS = ("/tmp", "/var/tmp", "/root", "/home", "/run")  # each a fresh tmpfs inside
# The system a command needs, read-only: programs and libraries (merged-/usr links kept as links),
# and of /etc only what the C library and Python read: the dynamic linker's cache and settings,
# user and group names (nobody's), name service settings, certificates and the time zone. Not
# /etc as a whole: a host keeps credentials there.
SYSTEM_PATHS = (
    "/usr",
    "/bin",
    "/sbin",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/passwd",
    "/etc/group",
    "/etc/nsswitch.conf",
    "/etc/ssl/certs",
    "/etc/localtime",
)
# The C library (sysconf), OpenMP and torch count CPUs and NUMA nodes from these.
SYSTEM_SYS_PATHS = ("/sys/devices/system/cpu", "/sys/devices/system/node")
# A GPU's driver and NVML read its PCI topology, NUMA nodes and module state across /sys:
# hardware state, no user's files.
GPU_SYSTEM_PATHS = ("/sys",)
# setpriv becomes nobody with no supplementary groups, no capabilities left anywhere (effective,
# inheritable, bounding) and no_new_privs, so not even a setuid binary can give root back.
_SETPRIV_DROP_ROOT = (
    f"--reuid={SANDBOX_UID}",
    f"--regid={SANDBOX_UID}",
    "--clear-groups",
    "--inh-caps=-all",
    "--bounding-set=-all",
    "--no-new-privs",
)
_SETPRIV_CAPABILITIES = ("CAP_SETUID", "CAP_SETGID", "CAP_SETPCAP")  # what those steps need
_POLL_SECONDS = 0.05  # how often the command's exit and the wall limit are checked
_DRAIN_SECONDS = 1.0  # after the command ends, how long its last output may take to arrive
_READ_BYTES = 1 << 16


@dataclass(frozen=True)
class Limits:
    """Resource limits. Those set with setrlimit apply to each process, not to the tree."""

    wall_seconds: float = 3600  # the whole run, then the process tree is killed
    cpu_seconds: int | None = None  # RLIMIT_CPU per process: SIGXCPU, then SIGKILL 1 s later
    # RLIMIT_AS: address space, not resident memory. CUDA reserves huge virtual ranges, so a GPU
    # run needs None here.
    memory_bytes: int | None = 8 * 2**30
    file_bytes: int = 2 * 2**30  # RLIMIT_FSIZE: the largest file a process may write
    processes: int = 256  # RLIMIT_NPROC: see the module docstring for when it binds
    # the size of each private tmpfs (/tmp, /var/tmp, /root, /home, /run): RAM, so bounded
    private_dir_bytes: int = 256 * 2**20
    output_bytes: int = 1 * 2**20  # stdout and stderr kept: the first and last halves
    # For the job as a whole, where cgroup v2 is delegated (see the module docstring).
    # memory.max: resident memory and tmpfs files of all its processes together; None for none.
    total_memory_bytes: int | None = 8 * 2**30
    total_processes: int = 512  # pids.max: processes and threads together

    def describe(self) -> str:
        """The rlimits and wall limit, in one line for a job's log."""
        memory = _gib(self.memory_bytes)
        cpu = "none" if self.cpu_seconds is None else f"{self.cpu_seconds} s"
        return (
            f"limits: wall {self.wall_seconds:g} s for the run; per process (rlimits) address "
            f"space {memory}, CPU {cpu}, file size {self.file_bytes / 2**30:g} GiB, "
            f"{self.processes} processes; private tmpfs dirs {self.private_dir_bytes // 2**20} "
            "MiB each"
        )

    def describe_cgroup(self, problem: str | None) -> str:
        """The cgroup limits in force, or (``problem`` set) why there are none: one line."""
        if problem is not None:
            return f"no cgroup limits (total memory, total processes): {problem}"
        return (
            f"cgroup v2: memory.max {_gib(self.total_memory_bytes)}, pids.max "
            f"{self.total_processes} across the job's processes"
        )


def _gib(size: int | None) -> str:
    return "none" if size is None else f"{size / 2**30:g} GiB"


@dataclass(frozen=True)
class SandboxResult:
    """How a run ended. ``status`` is "ok" (exit 0), "failed" (another exit code), "timed_out"
    (the wall limit) or "killed" (a signal: ``detail`` names it and the limit it suggests)."""

    status: str
    returncode: int  # the exit code, or -N for signal N in both modes (bwrap reports 128 + N)
    detail: str  # one line for people, e.g. "killed by SIGXCPU (the CPU limit of 10 s)"
    output: str  # stdout and stderr interleaved; a note in the middle says what was dropped
    output_truncated_bytes: int
    wall_seconds: float
    confinement: str = ""  # which guards and limits were in force, for the job's log
    peak_rss_bytes: int = 0  # the largest resident set of any one process of the run
    peak_memory_bytes: int | None = None  # all its processes together (cgroup memory.peak)


@functools.cache
def sandbox_available() -> str | None:
    """None if ``run_sandboxed`` can sandbox here, else why not; probes once per process."""
    if shutil.which("bwrap") is None:
        return "bubblewrap is not installed (apt-get install bubblewrap)"
    if os.geteuid() == 0 and shutil.which("setpriv") is None:
        return "setpriv is missing (apt-get install util-linux), needed to drop root"
    with tempfile.TemporaryDirectory() as scratch:
        probe = subprocess.run(
            _sandbox_argv(["true"], Path(scratch), [], []),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
        )
    if probe.returncode != 0:
        return (
            f"bubblewrap cannot create a sandbox here ({probe.stderr.strip()}); it needs user "
            "namespaces enabled, or to run as root"
        )
    return None


def run_sandboxed(
    argv: Sequence[str],
    *,
    workdir: Path,
    readonly: Sequence[Path] = (),
    hidden: Sequence[Path] = (),
    env: dict[str, str],
    limits: Limits = Limits(),  # noqa: B008 - frozen, so one shared default is safe
    sandbox: bool = True,
    devices: Sequence[Path] = (),
) -> SandboxResult:
    """Run ``argv`` in ``workdir`` with exactly ``env`` as its environment, within ``limits``.

    Output is read as it comes, so a command printing gigabytes neither fills memory nor blocks.
    When the command exits, whatever it left running is killed; at the wall limit, all of it is.
    ``devices`` are device files passed through into the sandbox's minimal ``/dev`` (a GPU's).
    """
    workdir = Path(workdir).absolute()
    program, guards = None, "no sandbox: none of its guards"
    if sandbox:
        reason = sandbox_available()
        if reason is not None:
            raise ArenaError(
                f"cannot run {argv[0]} sandboxed: {reason}; fix that, or run it unsandboxed only "
                "if the competition allows it."
            )
        if os.geteuid() == 0:
            _give_to_sandbox_user(workdir)
        program, guards = seccomp_program()
    cgroup_parent, cgroup_problem = cgroup.job_cgroup_parent()
    confinement = f"{guards}\n{limits.describe()}\n{limits.describe_cgroup(cgroup_problem)}"
    with contextlib.ExitStack() as cleanup:
        job_cgroup = None
        if cgroup_parent is not None:
            job_cgroup = cleanup.enter_context(
                cgroup.job_cgroup(
                    cgroup_parent,
                    memory_bytes=limits.total_memory_bytes,
                    tasks=limits.total_processes,
                )
            )
        with _program_file(program) as seccomp_fd:
            if sandbox:
                command = _sandbox_argv(
                    list(argv),
                    workdir,
                    list(readonly),
                    list(hidden),
                    list(devices),
                    seccomp_fd,
                    limits.private_dir_bytes,
                )
            else:
                command = list(argv)
            start = time.monotonic()
            process = subprocess.Popen(
                command,
                cwd=workdir,
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, killed as one
                preexec_fn=_child_setup(limits, job_cgroup),
                pass_fds=() if seccomp_fd is None else (seccomp_fd,),
            )

        def kill_all() -> None:
            _kill_group(process.pid)
            if job_cgroup is not None:  # what left the process group too
                cgroup.kill_processes(job_cgroup)

        assert process.stdout is not None
        output = _Output(limits.output_bytes)
        timed_out = _pump(process, output, deadline=start + limits.wall_seconds, kill=kill_all)
        kill_all()
        # wait4, not wait: its usage covers the command's process tree (every process waited
        # for below it), measured here, outside, where the command cannot forge it
        _, wait_status, usage = os.wait4(process.pid, 0)
        returncode = process.returncode = os.waitstatus_to_exitcode(wait_status)
        process.stdout.close()
        wall_seconds = time.monotonic() - start
        cgroup_usage = None if job_cgroup is None else cgroup.read_usage(job_cgroup)

    if sandbox and returncode > 128 and returncode - 128 in signal.valid_signals():
        returncode = 128 - returncode  # bwrap turns "killed by signal N" into exit code 128 + N
    if timed_out:
        status = "timed_out"
        detail = f"stopped at the wall-clock limit of {limits.wall_seconds:g} s"
    elif returncode < 0:
        status, detail = "killed", _signal_detail(-returncode, limits)
    else:
        status, detail = ("ok" if returncode == 0 else "failed"), f"exited with code {returncode}"
    if cgroup_usage is not None:
        detail = _cgroup_detail(detail, status, cgroup_usage, limits)
    return SandboxResult(
        status,
        returncode,
        detail,
        output.text(),
        output.dropped,
        round(wall_seconds, 3),
        confinement,
        usage.ru_maxrss * 1024,  # kilobytes on Linux
        None if cgroup_usage is None else cgroup_usage.peak_memory_bytes,
    )


def _cgroup_detail(detail: str, status: str, usage: cgroup.CgroupUsage, limits: Limits) -> str:
    """The run's ``detail``, saying which of the cgroup's limits it met."""
    if usage.oom_kills:
        memory = (
            "the job's processes together passed the memory limit of "
            f"{_gib(limits.total_memory_bytes)}"
        )
        detail = f"killed: {memory}" if status == "killed" else f"{detail}; killed: {memory}"
    if usage.refused_forks:
        detail += (
            f"; {usage.refused_forks} new processes or threads were refused at the limit of "
            f"{limits.total_processes} across the job (cgroup pids.max)"
        )
    return detail


@contextlib.contextmanager
def _program_file(program: bytes | None) -> Iterator[int | None]:
    """A file descriptor reading ``program`` from its start (bwrap's ``--seccomp FD``), closed
    once the command has started; None for no program."""
    if program is None:
        yield None
        return
    descriptor = os.memfd_create("mergearena-seccomp", os.MFD_CLOEXEC)
    try:
        os.write(descriptor, program)
        os.lseek(descriptor, 0, os.SEEK_SET)
        yield descriptor
    finally:
        os.close(descriptor)


def _sandbox_argv(
    argv: list[str],
    workdir: Path,
    readonly: list[Path],
    hidden: list[Path],
    devices: list[Path] = [],  # noqa: B006 - never modified
    seccomp_fd: int | None = None,
    private_dir_bytes: int = Limits.private_dir_bytes,
) -> list[str]:
    as_root = os.geteuid() == 0
    command = [str(shutil.which("bwrap")), "--die-with-parent", "--new-session"]
    if as_root:
        # Every namespace but the user one (see the module docstring); keep only the
        # capabilities setpriv needs to become nobody, which then drops them all.
        command += ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts"]
        command += ["--unshare-cgroup-try", "--cap-drop", "ALL"]
        command += [
            arg for capability in _SETPRIV_CAPABILITIES for arg in ("--cap-add", capability)
        ]
    else:
        command += ["--unshare-all"]
    # The new root is an empty tmpfs: only what is mounted below exists inside.
    command += _system_mounts(gpu=bool(devices))
    command += ["--dev", "/dev", "--proc", "/proc"]
    for device in devices:
        command += ["--dev-bind", str(device), str(device)]
    for directory in PRIVATE_DIRS:
        # writable by nobody, like /tmp, and of a bounded size (a tmpfs fills RAM)
        command += ["--size", str(private_dir_bytes), "--perms", "1777", "--tmpfs", directory]
    bound = [path for p in readonly for path in _both_paths(p)]
    closed = _closed_ancestors([*_both_paths(workdir), *bound]) if as_root else []
    command += _layered_mounts(bound, closed, hidden)
    for path in _both_paths(workdir):
        command += [*_mount_point(path), "--bind", str(path), str(path)]
    # the root tmpfs itself: read-only, so no one (the unprivileged user without root
    # either) can fill RAM through it
    command += ["--remount-ro", "/"]
    if seccomp_fd is not None:
        command += ["--seccomp", str(seccomp_fd)]
    command += ["--chdir", str(workdir), "--"]
    if as_root:
        command += [str(shutil.which("setpriv")), *_SETPRIV_DROP_ROOT, "--"]
    return command + argv


def _system_mounts(*, gpu: bool) -> list[str]:
    """The system, read-only: ``SYSTEM_PATHS`` as the host has them (a merged-/usr link stays a
    link), and what of ``/sys`` a run reads (all of it for a GPU's driver)."""
    command: list[str] = []
    for name in [*SYSTEM_PATHS, *(GPU_SYSTEM_PATHS if gpu else SYSTEM_SYS_PATHS)]:
        path = Path(name)
        if path.is_symlink():
            command += [*_mount_point(path), "--symlink", os.readlink(path), name]
        elif path.exists():
            command += [*_mount_point(path), "--ro-bind", name, name]
    return command


def _layered_mounts(bound: list[Path], closed: list[Path], hidden: list[Path]) -> list[str]:
    """Mount ``closed`` (empty tmpfs), ``bound`` (read-only) and ``hidden`` paths, each after
    every path above it: a path bound inside a hidden directory shows through it (the one
    admitted model of a folder of models), and a hidden path inside a bound one stays hidden.

    A hidden path outside everything mounted is skipped: it is not there anyway.
    """
    layers: list[tuple[int, int, list[str]]] = []  # (depth, order at one depth, arguments)
    for directory in closed:
        layers.append((len(directory.parts), 0, ["--tmpfs", str(directory)]))
    for path in bound:
        layers.append(
            (len(path.parts), 1, [*_mount_point(path), "--ro-bind", str(path), str(path)])
        )
    for path in (Path(p).resolve() for p in hidden):
        if not any(path.is_relative_to(top) for top in [*bound, *closed]):
            continue
        if path.is_dir():
            layers.append((len(path.parts), 2, ["--tmpfs", str(path)]))
        elif path.exists():
            layers.append((len(path.parts), 2, ["--ro-bind", "/dev/null", str(path)]))
    layers.sort(key=lambda layer: layer[:2])  # stable: the given order within a level
    return [arg for *_, arguments in layers for arg in arguments]


def _mount_point(path: Path) -> list[str]:
    """Create the path's ancestors that lie on a tmpfs with mode 0755 (bwrap would make them
    0700, closed to nobody); for those that exist already this does nothing."""
    return [arg for ancestor in reversed(path.parents[:-1]) for arg in ("--dir", str(ancestor))]


def _both_paths(path: Path) -> list[Path]:
    """The path as given and as resolved: a symlink to it may lie under a private tmpfs."""
    given = Path(path).absolute()
    real = given.resolve()
    return [given] if real == given else [given, real]


def _closed_ancestors(paths: list[Path]) -> list[Path]:
    """The top directory nobody cannot enter on the way to each path, outside the private dirs.

    Each gets an empty tmpfs so the bound paths inside it can be reached; nobody could not see
    anything else in it anyway.
    """
    closed: list[Path] = []
    for path in paths:
        for ancestor in reversed(path.parents):
            if any(ancestor.is_relative_to(private) for private in PRIVATE_DIRS):
                break
            if not os.stat(ancestor).st_mode & stat.S_IXOTH:
                if ancestor not in closed:
                    closed.append(ancestor)
                break
    return closed


def _give_to_sandbox_user(workdir: Path) -> None:
    """Make the workdir tree nobody's, so the command (running as nobody) can write there."""
    os.lchown(workdir, SANDBOX_UID, SANDBOX_UID)
    for directory, subdirectories, files in os.walk(workdir):
        for name in [*subdirectories, *files]:
            os.lchown(os.path.join(directory, name), SANDBOX_UID, SANDBOX_UID)


def _child_setup(limits: Limits, job_cgroup: Path | None) -> Callable[[], None]:
    """What the child runs between fork and exec: join the job's cgroup, if any, and set the
    rlimits; bwrap and everything below it inherit both."""
    wanted = {
        resource.RLIMIT_CORE: 0,
        resource.RLIMIT_FSIZE: limits.file_bytes,
        resource.RLIMIT_NPROC: limits.processes,
    }
    if limits.memory_bytes is not None:
        wanted[resource.RLIMIT_AS] = limits.memory_bytes

    def set_up() -> None:
        if job_cgroup is not None:
            cgroup.join(job_cgroup)
        for which, value in wanted.items():
            _lower_limit(which, value, value)
        if limits.cpu_seconds is not None:
            # The soft limit sends SIGXCPU; the hard one, a second later, SIGKILL.
            _lower_limit(resource.RLIMIT_CPU, limits.cpu_seconds, limits.cpu_seconds + 1)

    return set_up


def _lower_limit(which: int, soft: int, hard: int) -> None:
    """Set a limit, never above the hard limit already in force (an unprivileged caller can't)."""
    _, current_hard = resource.getrlimit(which)
    if current_hard != resource.RLIM_INFINITY:
        soft, hard = min(soft, current_hard), min(hard, current_hard)
    resource.setrlimit(which, (soft, hard))


def _pump(
    process: subprocess.Popen[bytes], output: _Output, deadline: float, kill: Callable[[], None]
) -> bool:
    """Read output until the command is over; return whether it hit the wall limit.

    The command is over when it exits (anything it left behind is then killed, by ``kill``) or
    at the deadline (all of it is killed). Output still arriving is read for a moment more,
    until every writer is gone, which the pid namespace (or the job's cgroup) guarantees.
    """
    assert process.stdout is not None
    descriptor = process.stdout.fileno()
    os.set_blocking(descriptor, False)
    timed_out, end_of_output = False, False
    stop_at: float | None = None  # set when the command is over: the end of draining
    with selectors.DefaultSelector() as selector:
        selector.register(descriptor, selectors.EVENT_READ)
        while True:
            now = time.monotonic()
            if stop_at is None:
                exited = _has_exited(process.pid)
                if exited or now >= deadline:
                    timed_out = not exited
                    kill()
                    stop_at = now + _DRAIN_SECONDS
            if stop_at is not None and (end_of_output or now >= stop_at):
                return timed_out
            if end_of_output:  # closed its output but still running: wait for it
                time.sleep(_POLL_SECONDS)
            elif selector.select(timeout=_POLL_SECONDS):
                chunk = os.read(descriptor, _READ_BYTES)
                end_of_output = not chunk  # every writer has closed its end
                output.add(chunk)


def _has_exited(pid: int) -> bool:
    """Whether the child exited, without reaping it: until it is reaped its pid, and so its
    process group's id, cannot be reused, which makes killing the group safe."""
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _signal_detail(number: int, limits: Limits) -> str:
    name = signal.Signals(number).name
    if number == signal.SIGXCPU:
        return f"killed by {name} (the CPU limit of {limits.cpu_seconds} s per process)"
    if number == signal.SIGXFSZ:
        return f"killed by {name} (the file size limit of {limits.file_bytes} bytes)"
    return f"killed by {name}"


class _Output:
    """Keep the first and last halves of ``limit`` bytes of output and count the rest."""

    def __init__(self, limit: int) -> None:
        self.head_limit, self.tail_limit = limit - limit // 2, limit // 2
        self.head, self.tail = bytearray(), bytearray()
        self.total = 0

    def add(self, chunk: bytes) -> None:
        self.total += len(chunk)
        room = self.head_limit - len(self.head)
        if room > 0:
            self.head += chunk[:room]
            chunk = chunk[room:]
        if self.tail_limit and chunk:
            self.tail += chunk
            if len(self.tail) > 2 * self.tail_limit:  # trim now and then, not on every chunk
                del self.tail[: -self.tail_limit]

    def _kept_tail(self) -> bytes:
        return bytes(self.tail[-self.tail_limit :]) if self.tail_limit else b""

    @property
    def dropped(self) -> int:
        return self.total - len(self.head) - len(self._kept_tail())

    def text(self) -> str:
        note = f"\n[... {self.dropped} bytes of output dropped ...]\n" if self.dropped else ""
        return (bytes(self.head) + note.encode() + self._kept_tail()).decode(errors="replace")
