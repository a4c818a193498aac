"""The sandbox, attacked from inside by tiny Python programs: network, hidden files, writes outside
the workdir, the environment, the wall limit, output floods, fork bombs, memory, file size, CPU,
and the cgroup limits on the job as a whole.

Tests marked with both modes also pin that ``sandbox=False`` keeps the same environment, limits,
timeout and output cap. The cgroup's file writing is tested on a fake cgroup tree; its effects,
only where cgroup v2 is delegated to this process (they are skipped elsewhere, saying why).
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mergearena.arena import cgroup
from mergearena.arena import sandbox as sandbox_module
from mergearena.arena.cgroup import CgroupUnusable, CgroupUsage, delegated_parent
from mergearena.arena.sandbox import Limits, SandboxResult, run_sandboxed, sandbox_available
from mergearena.errors import ArenaError

# The interpreter must be visible inside: the venv, and the prefix it links into (under /root,
# which the sandbox replaces with an empty tmpfs).
PYTHON_PATHS = sorted(
    {Path(sys.prefix), Path(sys.base_prefix), Path(os.path.realpath(sys.executable)).parent}
)
ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
# Set by bwrap (--chdir) and by Python's locale coercion: not from the parent's environment.
ADDED_BY_TOOLS = {"PWD", "LC_CTYPE"}

needs_sandbox = pytest.mark.skipif(
    sandbox_available() is not None, reason=f"no sandbox here: {sandbox_available()}"
)
BOTH_MODES = [
    pytest.param(True, marks=needs_sandbox, id="sandboxed"),
    pytest.param(False, id="unsandboxed"),
]


def run_python(
    code: str,
    tmp_path: Path,
    *args: str,
    sandbox: bool = True,
    readonly: list[Path] | None = None,
    hidden: list[Path] | None = None,
    limits: Limits = Limits(wall_seconds=20),  # noqa: B008
) -> SandboxResult:
    workdir = tmp_path / "work"
    workdir.mkdir(exist_ok=True)
    return run_sandboxed(
        [sys.executable, "-c", code, *args],
        workdir=workdir,
        readonly=[*PYTHON_PATHS, *(readonly or [])],
        hidden=hidden or [],
        env=ENV,
        limits=limits,
        sandbox=sandbox,
    )


def processes_with(marker: str) -> list[int]:
    """Host pids whose command line holds ``marker`` (zombies have an empty one)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:  # exited while we looked
            pass
    return found


def wait_until_gone(marker: str, seconds: float = 3.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while (left := processes_with(marker)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


NETWORK_PROBE = """
import socket, sys
targets = [("127.0.0.1", int(sys.argv[1])), ("1.1.1.1", 53)][: int(sys.argv[2])]
for host, port in targets:
    try:
        socket.create_connection((host, port), timeout=2).close()
        print(host, "connected")
    except OSError as error:
        print(host, "failed", type(error).__name__)
"""


@needs_sandbox
@pytest.mark.parametrize("seccomp", [True, False], ids=["filtered", "namespaces-only"])
def test_network_is_unreachable_inside(tmp_path: Path, monkeypatch, seccomp: bool) -> None:
    """Neither the internet nor a service on the host's loopback answers from inside: the
    seccomp filter refuses the socket itself, and without it the network namespace has nothing
    to connect to."""
    if not seccomp:
        monkeypatch.setattr(sandbox_module, "seccomp_program", lambda: (None, "off"))
    with socket.create_server(("127.0.0.1", 0)) as server:  # the backlog accepts, no thread
        port = server.getsockname()[1]
        result = run_python(NETWORK_PROBE, tmp_path, str(port), "2")
    assert result.status == "ok", result.output
    refused = "PermissionError" if seccomp else "ConnectionRefusedError"
    assert f"127.0.0.1 failed {refused}" in result.output
    assert "1.1.1.1 failed" in result.output
    assert "connected" not in result.output


def test_network_probe_reaches_loopback_unsandboxed(tmp_path: Path) -> None:
    """The control for the test above: the same probe does connect without the sandbox."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        result = run_python(NETWORK_PROBE, tmp_path, str(port), "1", sandbox=False)
    assert "127.0.0.1 connected" in result.output


READ_PROBE = """
import sys
for path in sys.argv[1:]:
    try:
        print(path, "read", repr(open(path).read()))
    except OSError as error:
        print(path, "failed", type(error).__name__)
"""


@needs_sandbox
def test_hidden_paths_cannot_be_read(tmp_path: Path) -> None:
    """A hidden directory is empty and a hidden file cannot be opened (it is /dev/null on a
    nodev mount), even inside a readonly path."""
    shared = tmp_path / "shared"
    (shared / "data").mkdir(parents=True)
    (shared / "public.txt").write_text("public")
    (shared / "data" / "targets.csv").write_text("SECRET-TARGETS")
    (shared / "key.txt").write_text("SECRET-KEY")
    paths = [shared / "public.txt", shared / "data" / "targets.csv", shared / "key.txt"]

    result = run_python(
        READ_PROBE,
        tmp_path,
        *map(str, paths),
        readonly=[shared],
        hidden=[shared / "data", shared / "key.txt"],
    )

    assert f"{paths[0]} read 'public'" in result.output
    assert f"{paths[1]} failed FileNotFoundError" in result.output
    assert f"{paths[2]} failed PermissionError" in result.output
    assert "SECRET" not in result.output


LOOK_PROBE = """
import json, os, sys
def look(path):
    try:
        if os.path.isdir(path):
            return sorted(os.listdir(path))
        with open(path, "rb") as handle:
            return "read " + repr(handle.read(40))
    except OSError as error:
        return type(error).__name__
print(json.dumps({path: look(path) for path in sys.argv[1:]}))
"""


def look_inside(tmp_path: Path, paths: list[Path | str], **options) -> dict[str, object]:
    """What a sandboxed process finds at each path: a sorted listing, "read b'...'" or the
    error's name."""
    result = run_python(LOOK_PROBE, tmp_path, *map(str, paths), **options)
    assert result.status == "ok", result.output
    return json.loads(result.output.strip().splitlines()[-1])


@pytest.fixture()
def host_file() -> Iterator[Path]:
    """A world-readable file of the host's, outside anything the sandbox is given."""
    directory = Path(f"/opt/mergearena-probe-{secrets.token_hex(4)}")
    directory.mkdir(mode=0o755)
    try:
        secret = directory / "secret.txt"
        secret.write_text("SECRET-HOST-FILE")
        secret.chmod(0o644)
        yield secret
    finally:
        shutil.rmtree(directory)


@needs_sandbox
def test_the_hosts_root_is_not_there_only_the_system_and_what_was_given(
    tmp_path: Path, host_file: Path
) -> None:
    """Nothing of the host's ``/`` shows but the system (read-only) and the given paths: not a
    world-readable file elsewhere, not this checkout (beside the interpreter's venv, if it lives
    there), not /etc beyond the few files the C library reads."""
    checkout = Path(__file__).resolve().parents[1]
    found = look_inside(
        tmp_path,
        [
            host_file,
            host_file.parent,
            checkout / "README.md",
            checkout / "tests",
            "/etc/shadow",
            "/etc/hostname",
            "/etc/passwd",
            "/usr/bin/env",
            "/srv",
            "/boot",
            "/",
        ],
    )
    for path in [host_file, host_file.parent, checkout / "README.md", checkout / "tests"]:
        assert found[str(path)] == "FileNotFoundError", found
    for path in ["/etc/shadow", "/etc/hostname", "/srv", "/boot"]:
        assert found[path] == "FileNotFoundError", found
    assert str(found["/etc/passwd"]).startswith("read b'root:"), found
    assert str(found["/usr/bin/env"]).startswith("read b'\\x7fELF"), found
    given = {Path(p).parts[1] for p in [*PYTHON_PATHS, tmp_path]}
    system = {"usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "etc", "sys", "dev"}
    private = {"proc", "tmp", "var", "root", "home", "run"}
    assert set(found["/"]) <= system | private | given, found["/"]


@needs_sandbox
def test_a_path_bound_inside_a_hidden_directory_shows_alone(tmp_path: Path) -> None:
    """A folder of models hidden, one of them bound: that one is there, its neighbours are not
    (the zoo's committed experts, of which a competition admits some)."""
    models = tmp_path / "shared" / "models"
    for name in ("admitted", "other"):
        (models / name).mkdir(parents=True)
        (models / name / "weights").write_text(f"{name} weights")
    found = look_inside(
        tmp_path,
        [models, models / "admitted" / "weights", models / "other" / "weights"],
        readonly=[models.parent, models / "admitted"],
        hidden=[models],
    )
    assert found[str(models)] == ["admitted"]
    assert found[str(models / "admitted" / "weights")] == "read b'admitted weights'"
    assert found[str(models / "other" / "weights")] == "FileNotFoundError"


@needs_sandbox
@pytest.mark.skipif(os.geteuid() != 0, reason="the uid drop happens only when run as root")
def test_root_only_files_cannot_be_read(tmp_path: Path) -> None:
    """As root, the command runs as nobody: root's 0600 files in a bound path stay closed (and
    /etc/shadow is not even there)."""
    shared = tmp_path / "shared"
    shared.mkdir()
    private = shared / "root-only.txt"
    private.write_text("SECRET")
    private.chmod(0o600)

    result = run_python(READ_PROBE, tmp_path, str(private), "/etc/shadow", readonly=[shared])

    assert f"{private} failed PermissionError" in result.output
    assert "/etc/shadow failed FileNotFoundError" in result.output


@needs_sandbox
def test_writes_land_only_in_the_workdir(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    escape = Path(f"/tmp/mergearena-escape-{secrets.token_hex(4)}")  # a private tmpfs inside
    code = """
import sys
for path in sys.argv[1:]:
    try:
        open(path, "w").write("x")
        print(path, "written")
    except OSError as error:
        print(path, "failed", type(error).__name__)
"""
    targets = [shared / "new.txt", Path(__file__).parent / "escape.txt", escape, "in-work.txt"]

    result = run_python(code, tmp_path, *map(str, targets), readonly=[shared])

    assert f"{targets[0]} failed" in result.output  # read-only bind
    assert f"{targets[1]} failed" in result.output  # the host's / is read-only
    assert not (shared / "new.txt").exists() and not targets[1].exists()
    assert not escape.exists()  # written to the sandbox's own /tmp, gone with it
    assert (tmp_path / "work" / "in-work.txt").read_text() == "x"


@needs_sandbox
@pytest.mark.skipif(os.geteuid() != 0, reason="the uid drop happens only when run as root")
def test_workdir_under_a_directory_nobody_cannot_enter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker's scratch dir outside /tmp may sit in a 0700 directory: that directory becomes
    an empty tmpfs holding only the workdir, which nobody can then reach and write."""
    monkeypatch.setattr(sandbox_module, "PRIVATE_DIRS", ("/var/tmp", "/root", "/home", "/run"))
    closed = tmp_path / "closed"
    (closed / "work").mkdir(parents=True)
    closed.chmod(0o700)
    (closed / "sibling.txt").write_text("SECRET")
    code = "import os; open('out.txt', 'w').write('x'); print(os.listdir('..'))"
    result = run_sandboxed(
        [sys.executable, "-c", code],
        workdir=closed / "work",
        readonly=PYTHON_PATHS,
        env=ENV,
        limits=Limits(wall_seconds=20),
    )
    assert result.status == "ok", result.output
    assert result.output.strip() == "['work']"
    assert (closed / "work" / "out.txt").read_text() == "x"


@pytest.mark.parametrize("sandbox", BOTH_MODES)
def test_environment_is_only_what_was_passed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sandbox: bool
) -> None:
    monkeypatch.setenv("MERGEARENA_TEST_SECRET", "hunter2")
    code = "import json, os; print(json.dumps(dict(os.environ)))"
    result = run_python(code, tmp_path, sandbox=sandbox)
    environment = json.loads(result.output)
    assert {k: v for k, v in environment.items() if k not in ADDED_BY_TOOLS} == ENV
    assert "hunter2" not in result.output


SPAWN_SLEEPER = """
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", sys.argv[1]])
print("started", flush=True)
time.sleep(float(sys.argv[2]))
"""


@pytest.mark.parametrize("sandbox", BOTH_MODES)
def test_wall_limit_kills_the_whole_tree(tmp_path: Path, sandbox: bool) -> None:
    marker = f"mergearena-sleeper-{secrets.token_hex(6)}"
    # 5 s leaves time to start Python on a busy machine; 30 s is well short of the sleeper's 60.
    limits = Limits(wall_seconds=5)
    result = run_python(SPAWN_SLEEPER, tmp_path, marker, "60", sandbox=sandbox, limits=limits)
    assert result.status == "timed_out", result
    assert "wall-clock limit of 5 s" in result.detail
    assert 5 <= result.wall_seconds < 30
    assert "started" in result.output
    assert wait_until_gone(marker) == []


@pytest.mark.parametrize("sandbox", BOTH_MODES)
def test_processes_left_behind_die_when_the_command_exits(tmp_path: Path, sandbox: bool) -> None:
    marker = f"mergearena-sleeper-{secrets.token_hex(6)}"
    result = run_python(SPAWN_SLEEPER, tmp_path, marker, "0", sandbox=sandbox)
    assert result.status == "ok", result
    assert result.wall_seconds < 30  # not held up by the 60 s sleeper keeping the pipe open
    assert wait_until_gone(marker) == []


@pytest.mark.parametrize("sandbox", BOTH_MODES)
def test_output_flood_is_capped_and_drained(tmp_path: Path, sandbox: bool) -> None:
    """200 MB of output: the run ends normally, the head and tail are kept, the rest counted."""
    code = """
import sys
sys.stdout.write("THE START\\n"); sys.stdout.flush()
block = b"x" * 2**20
for _ in range(200):
    sys.stdout.buffer.write(block)
print("\\nTHE END")
"""
    limits = Limits(wall_seconds=30, output_bytes=64 * 1024)
    result = run_python(code, tmp_path, sandbox=sandbox, limits=limits)
    assert result.status == "ok", result.detail
    total = len("THE START\n") + 200 * 2**20 + len("\nTHE END\n")
    assert result.output_truncated_bytes == total - 64 * 1024
    assert result.output.startswith("THE START")
    assert result.output.endswith("THE END\n")
    assert f"[... {total - 64 * 1024} bytes of output dropped ...]" in result.output


# Forks until 20 forks have failed: it limits itself, so that a failure of the limit under test
# cannot harm the machine.
FORK_BOMB = """
import os, time
children = failures = 0
for _ in range(2000):
    try:
        pid = os.fork()
    except OSError:
        failures += 1
        if failures >= 20:
            break
        continue
    if pid == 0:
        time.sleep(3)
        os._exit(0)
    children += 1
print("children", children, "failures", failures, flush=True)
"""


@needs_sandbox
def test_fork_bomb_is_bounded(tmp_path: Path) -> None:
    """RLIMIT_NPROC binds because the command does not run as root (see the module docstring)."""
    result = run_python(FORK_BOMB, tmp_path, limits=Limits(wall_seconds=10, processes=32))
    assert result.status == "ok", result.output
    children, failures = map(int, result.output.split()[1::2])
    assert children < 32 and failures == 20


@pytest.mark.parametrize("sandbox", BOTH_MODES)
def test_memory_limit_stops_a_large_allocation(tmp_path: Path, sandbox: bool) -> None:
    limits = Limits(wall_seconds=20, memory_bytes=512 * 2**20)
    result = run_python("bytearray(2 * 2**30)", tmp_path, sandbox=sandbox, limits=limits)
    assert result.status == "failed"
    assert "MemoryError" in result.output


@pytest.mark.parametrize("sandbox", BOTH_MODES)
def test_file_size_limit_stops_a_large_file(tmp_path: Path, sandbox: bool) -> None:
    limits = Limits(wall_seconds=20, file_bytes=2**20)
    code = "open('big.bin', 'wb').write(bytes(2 * 2**20))"
    result = run_python(code, tmp_path, sandbox=sandbox, limits=limits)
    assert result.status == "failed"
    assert "File too large" in result.output  # Python ignores SIGXFSZ and gets EFBIG
    assert (tmp_path / "work" / "big.bin").stat().st_size == 2**20


@pytest.mark.parametrize("sandbox", BOTH_MODES)
def test_cpu_limit_kills_a_busy_loop(tmp_path: Path, sandbox: bool) -> None:
    limits = Limits(wall_seconds=20, cpu_seconds=1)
    result = run_python("while True: pass", tmp_path, sandbox=sandbox, limits=limits)
    assert (result.status, result.returncode) == ("killed", -24)
    assert "SIGXCPU (the CPU limit of 1 s per process)" in result.detail


@pytest.mark.parametrize("sandbox", BOTH_MODES)
def test_exit_codes_and_signals_read_the_same_in_both_modes(tmp_path: Path, sandbox: bool) -> None:
    failed = run_python("raise SystemExit(3)", tmp_path, sandbox=sandbox)
    assert (failed.status, failed.returncode, failed.detail) == ("failed", 3, "exited with code 3")
    killed = run_python("import os; os.kill(os.getpid(), 9)", tmp_path, sandbox=sandbox)
    assert (killed.status, killed.returncode, killed.detail) == ("killed", -9, "killed by SIGKILL")


def test_unavailable_sandbox_is_reported_and_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sandbox_module.shutil, "which", lambda name: None)
    assert "bubblewrap is not installed" in (sandbox_available.__wrapped__() or "")
    monkeypatch.setattr(sandbox_module, "sandbox_available", lambda: "no bwrap")
    with pytest.raises(ArenaError, match="cannot run .* sandboxed: no bwrap"):
        run_python("pass", tmp_path)


# ------------------------------------------------------------------------------ the seccomp filter

SYSCALL_PROBES = r"""
import ctypes, errno, json, os, socket, subprocess, sys, threading
libc = ctypes.CDLL(None, use_errno=True)
found = {}

def errno_of(call):
    try:
        call()
    except OSError as error:
        return errno.errorcode.get(error.errno, str(error.errno))
    return "allowed"

def raw(name, *args):
    ctypes.set_errno(0)
    result = getattr(libc, name)(*args)
    return "allowed" if result >= 0 else errno.errorcode[ctypes.get_errno()]

found["inet socket"] = errno_of(lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
found["inet6 socket"] = errno_of(lambda: socket.socket(socket.AF_INET6, socket.SOCK_DGRAM))
found["raw socket"] = errno_of(lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, 1))
found["packet socket"] = errno_of(lambda: socket.socket(17, socket.SOCK_RAW, 0))
found["unix socket"] = errno_of(lambda: socket.socketpair(socket.AF_UNIX))
found["ptrace the worker"] = raw("ptrace", 16, int(sys.argv[1]), None, None)  # PTRACE_ATTACH
found["unshare a user namespace"] = raw("unshare", 0x10000000)
found["keyctl"] = raw("syscall", 250, 0, 0, 0, 0)  # keyctl(KEYCTL_GET_KEYRING_ID)
found["bpf"] = raw("syscall", 321, 0, 0, 0)
found["perf_event_open"] = raw("syscall", 298, 0, 0, -1, -1, 0)
found["mount"] = raw("mount", b"none", b"/tmp", b"tmpfs", 0, None)
thread = threading.Thread(target=lambda: found.setdefault("thread", "ran"))
thread.start(); thread.join()
found["subprocess"] = subprocess.run([sys.executable, "-c", "print(6 * 7)"],
                                     capture_output=True, text=True).stdout.strip()
print(json.dumps(found))
"""


@needs_sandbox
def test_the_seccomp_filter_refuses_what_a_job_has_no_use_for(tmp_path: Path) -> None:
    """Sockets but AF_UNIX, tracing the worker, new namespaces, keyrings, bpf, perf events and
    mounts fail with EPERM; threads and child processes work as before."""
    result = run_python(SYSCALL_PROBES, tmp_path, str(os.getpid()))
    assert result.status == "ok", result.output
    assert result.confinement.startswith("seccomp filter: in force"), result.confinement
    found = json.loads(result.output.strip().splitlines()[-1])
    refused = {name: code for name, code in found.items() if code == "EPERM"}
    assert set(refused) == {
        "inet socket",
        "inet6 socket",
        "raw socket",
        "packet socket",
        "ptrace the worker",
        "unshare a user namespace",
        "keyctl",
        "bpf",
        "perf_event_open",
        "mount",
    }, found
    assert (found["unix socket"], found["thread"], found["subprocess"]) == ("allowed", "ran", "42")


@needs_sandbox
def test_without_libseccomp_the_run_goes_on_and_says_the_filter_is_not_in_force(
    tmp_path: Path, monkeypatch
) -> None:
    missing = "seccomp filter: not in force (no libseccomp)"
    monkeypatch.setattr(sandbox_module, "seccomp_program", lambda: (None, missing))
    result = run_python(SYSCALL_PROBES, tmp_path, str(os.getpid()))
    assert result.status == "ok", result.output
    assert result.confinement.splitlines()[0] == missing
    found = json.loads(result.output.strip().splitlines()[-1])
    assert found["inet socket"] == "allowed"  # the filter, not the namespaces, refused it above


FILL_PROBE = r"""
import errno, os
for directory in ("/dev/shm", "/tmp"):
    written = 0
    try:
        with open(os.path.join(directory, "fill"), "wb") as handle:
            while written < 64 * 2**20:
                handle.write(b"x" * 2**20)
                handle.flush()
                written += 2**20
        print(directory, "filled", written // 2**20, "MiB")
    except OSError as error:
        print(directory, "stopped", errno.errorcode[error.errno], "at", written // 2**20, "MiB")
"""


@needs_sandbox
def test_shared_memory_is_closed_and_private_tmpfs_dirs_are_bounded(tmp_path: Path) -> None:
    """A tmpfs lives in RAM: /dev/shm takes nothing, /tmp no more than its size."""
    limits = Limits(wall_seconds=20, private_dir_bytes=16 * 2**20)
    result = run_python(FILL_PROBE, tmp_path, limits=limits)
    assert result.status == "ok", result.output
    assert "/dev/shm stopped EACCES at 0 MiB" in result.output
    assert "/tmp stopped ENOSPC at 16 MiB" in result.output
    assert "private tmpfs dirs 16 MiB each" in result.confinement


# ----------------------------------------------------------------- cgroup v2: on a fake cgroup tree

PID = 4242  # the worker's pid in the fake tree


def fake_cgroup_tree(
    root: Path, own: str = "/worker.service", processes: tuple[int, ...] = (PID,)
) -> tuple[str, str]:
    """A cgroup2 hierarchy at ``root`` as the kernel shows it, with the worker in ``own``; returns
    the texts of /proc/self/mounts and /proc/self/cgroup that go with it."""
    directory = root / own.lstrip("/")
    directory.mkdir(parents=True, exist_ok=True)
    for path in {root, directory}:
        (path / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
        (path / "cgroup.subtree_control").write_text("")
        (path / "cgroup.procs").write_text("")
    if directory != root:
        (directory / "cgroup.type").write_text("domain\n")  # the root alone has none
    (directory / "cgroup.procs").write_text("".join(f"{pid}\n" for pid in processes))
    mounts = f"proc /proc proc rw 0 0\ncgroup2 {root} cgroup2 rw,nosuid 0 0\n"
    return mounts, f"0::{own}\n"


def test_the_worker_moves_itself_out_of_its_cgroup_and_enables_memory_and_pids(
    tmp_path: Path,
) -> None:
    """cgroup v2 enables controllers for children only of a cgroup holding no processes."""
    mounts, self_cgroup = fake_cgroup_tree(tmp_path)
    parent = delegated_parent(tmp_path, mounts=mounts, self_cgroup=self_cgroup, pid=PID)
    assert parent == tmp_path / "worker.service"
    assert (parent / "mergearena-worker" / "cgroup.procs").read_text() == str(PID)
    assert (parent / "cgroup.subtree_control").read_text() == "+memory +pids"


def test_the_root_cgroup_may_keep_its_processes(tmp_path: Path) -> None:
    mounts, self_cgroup = fake_cgroup_tree(tmp_path, own="/")
    assert delegated_parent(tmp_path, mounts=mounts, self_cgroup=self_cgroup, pid=PID) == tmp_path
    assert not (tmp_path / "mergearena-worker").exists()
    assert (tmp_path / "cgroup.subtree_control").read_text() == "+memory +pids"


def test_a_worker_already_moved_uses_the_cgroup_above(tmp_path: Path) -> None:
    """A second look (a new process started from the moved worker) finds it prepared."""
    mounts, _ = fake_cgroup_tree(tmp_path)
    (tmp_path / "worker.service" / "cgroup.subtree_control").write_text("memory pids\n")
    (tmp_path / "worker.service" / "mergearena-worker").mkdir()
    self_cgroup = "0::/worker.service/mergearena-worker\n"
    parent = delegated_parent(tmp_path, mounts=mounts, self_cgroup=self_cgroup, pid=PID)
    assert parent == tmp_path / "worker.service"


def test_other_processes_in_the_worker_cgroup_are_left_alone_and_reported(tmp_path: Path) -> None:
    mounts, self_cgroup = fake_cgroup_tree(tmp_path, processes=(PID, 17, 18))
    with pytest.raises(CgroupUnusable, match=r"holds other processes too \(pids 17, 18\)"):
        delegated_parent(tmp_path, mounts=mounts, self_cgroup=self_cgroup, pid=PID)
    assert not (tmp_path / "worker.service" / "mergearena-worker").exists()
    assert (tmp_path / "worker.service" / "cgroup.subtree_control").read_text() == ""


@pytest.mark.parametrize(
    ("mounts", "self_cgroup", "controllers", "reason"),
    [
        ("cgroup2 /elsewhere cgroup2 rw 0 0", "0::/", None, "{root} is not mounted"),
        (
            "tmpfs {root} tmpfs rw 0 0\ncgroup2 {root}/unified cgroup2 rw 0 0",
            "0::/",
            None,
            "{root} is cgroup v1, not cgroup v2",
        ),
        (None, "4:memory:/worker\n", None, "this process is in no cgroup v2 hierarchy"),
        (None, None, "cpu memory", "lacks the controllers pids"),
    ],
    ids=["unmounted", "cgroup-v1", "no-v2-line", "no-pids-controller"],
)
def test_why_cgroups_cannot_be_used_is_said(
    tmp_path: Path,
    mounts: str | None,
    self_cgroup: str | None,
    controllers: str | None,
    reason: str,
) -> None:
    fake_mounts, fake_self = fake_cgroup_tree(tmp_path)
    if controllers is not None:
        (tmp_path / "worker.service" / "cgroup.controllers").write_text(controllers)
    with pytest.raises(CgroupUnusable, match=reason.format(root=tmp_path)):
        delegated_parent(
            tmp_path,
            mounts=fake_mounts if mounts is None else mounts.format(root=tmp_path),
            self_cgroup=fake_self if self_cgroup is None else self_cgroup,
            pid=PID,
        )


def test_job_cgroups_of_dead_workers_are_removed(tmp_path: Path) -> None:
    mounts, self_cgroup = fake_cgroup_tree(tmp_path)
    gone = tmp_path / "worker.service" / "job-999999999-abcd"  # above any pid_max
    ours = tmp_path / "worker.service" / f"job-{os.getpid()}-abcd"
    gone.mkdir()
    ours.mkdir()
    delegated_parent(tmp_path, mounts=mounts, self_cgroup=self_cgroup, pid=PID)
    assert not gone.exists() and ours.exists()


def test_a_job_cgroup_gets_the_memory_and_process_limits(tmp_path: Path) -> None:
    job = tmp_path / "job"
    job.mkdir()
    (job / "memory.swap.max").write_text("max\n")  # present only with swap accounting
    (job / "memory.oom.group").write_text("0\n")
    cgroup.set_limits(job, memory_bytes=16 * 2**30, tasks=512)
    written = {path.name: path.read_text() for path in job.iterdir()}
    assert written == {
        "memory.max": str(16 * 2**30),
        "memory.swap.max": "0",  # memory cannot escape the limit into swap
        "memory.oom.group": "1",  # at the limit the whole job is killed, not one process
        "pids.max": "512",
    }
    cgroup.set_limits(tmp_path, memory_bytes=None, tasks=8)
    assert (tmp_path / "memory.max").read_text() == "max"
    assert not (tmp_path / "memory.swap.max").exists()  # never created where absent


def test_what_a_job_cgroup_recorded_is_read(tmp_path: Path) -> None:
    assert cgroup.read_usage(tmp_path) == CgroupUsage(None, 0, 0)  # an older kernel's files
    (tmp_path / "memory.peak").write_text("734003200\n")
    (tmp_path / "memory.events").write_text(
        "low 0\nhigh 0\nmax 12\noom 1\noom_kill 2\noom_group_kill 1\n"
    )
    (tmp_path / "pids.events").write_text("max 7\n")
    assert cgroup.read_usage(tmp_path) == CgroupUsage(734003200, 2, 7)


def test_without_cgroup_kill_each_listed_process_is_killed(tmp_path: Path) -> None:
    sleeper = subprocess.Popen(["sleep", "60"])  # noqa: S603, S607
    try:
        (tmp_path / "cgroup.procs").write_text(f"{sleeper.pid}\n")
        cgroup.kill_processes(tmp_path)
        assert sleeper.wait(timeout=10) == -signal.SIGKILL
    finally:
        sleeper.kill()
    (tmp_path / "cgroup.kill").write_text("")
    cgroup.kill_processes(tmp_path)  # kernel 5.14+: one write kills them all
    assert (tmp_path / "cgroup.kill").read_text() == "1"


def test_the_log_names_the_cgroup_limits_or_why_there_are_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    limits = Limits(total_memory_bytes=16 * 2**30, total_processes=512)
    assert limits.describe_cgroup(None) == (
        "cgroup v2: memory.max 16 GiB, pids.max 512 across the job's processes"
    )
    why = "/sys/fs/cgroup is cgroup v1, not cgroup v2"
    monkeypatch.setattr(cgroup, "job_cgroup_parent", lambda: (None, why))
    result = run_python("pass", tmp_path, sandbox=False)
    assert result.status == "ok", result.output
    assert result.confinement.splitlines()[2] == (
        f"no cgroup limits (total memory, total processes): {why}"
    )
    assert result.peak_memory_bytes is None


@pytest.mark.parametrize(
    ("detail", "status", "usage", "expected"),
    [
        (
            "killed by SIGKILL",
            "killed",
            CgroupUsage(None, 1, 0),
            "killed: the job's processes together passed the memory limit of 0.5 GiB",
        ),
        (
            "exited with code 1",
            "failed",
            CgroupUsage(None, 0, 3),
            "exited with code 1; 3 new processes or threads were refused at the limit of 24 "
            "across the job (cgroup pids.max)",
        ),
        ("exited with code 0", "ok", CgroupUsage(2**20, 0, 0), "exited with code 0"),
    ],
    ids=["memory", "processes", "neither"],
)
def test_a_run_stopped_by_a_cgroup_limit_says_which(
    detail: str, status: str, usage: CgroupUsage, expected: str
) -> None:
    limits = Limits(total_memory_bytes=2**29, total_processes=24)
    assert sandbox_module._cgroup_detail(detail, status, usage, limits) == expected


# ----------------------------------------------------- cgroup v2: real, where it is delegated here

CGROUP_PARENT, NO_CGROUP = cgroup.job_cgroup_parent()
needs_cgroup = pytest.mark.skipif(
    NO_CGROUP is not None, reason=f"no cgroup v2 delegated here: {NO_CGROUP}"
)
BOTH_MODES_WITH_CGROUP = [
    pytest.param(True, marks=[needs_sandbox, needs_cgroup], id="sandboxed"),
    pytest.param(False, marks=needs_cgroup, id="unsandboxed"),
]


def job_cgroups_left() -> list[Path]:
    assert CGROUP_PARENT is not None
    return sorted(CGROUP_PARENT.glob(f"{cgroup.JOB_PREFIX}{os.getpid()}-*"))


@pytest.mark.parametrize("sandbox", BOTH_MODES_WITH_CGROUP)
def test_forks_past_pids_max_are_refused_and_said(tmp_path: Path, sandbox: bool) -> None:
    """pids.max binds the job as a whole, whoever it runs as (RLIMIT_NPROC does not bind
    root)."""
    limits = Limits(wall_seconds=20, processes=256, total_processes=24)
    result = run_python(FORK_BOMB, tmp_path, sandbox=sandbox, limits=limits)
    assert result.status == "ok", result.output
    children, failures = map(int, result.output.split()[1::2])
    assert children < 24 and failures == 20
    assert "pids.max 24 across the job's processes" in result.confinement.splitlines()[2]
    assert result.detail.startswith("exited with code 0; ")
    assert "refused at the limit of 24 across the job (cgroup pids.max)" in result.detail
    assert job_cgroups_left() == []


@pytest.mark.parametrize("sandbox", BOTH_MODES_WITH_CGROUP)
def test_processes_together_past_memory_max_kill_the_job(tmp_path: Path, sandbox: bool) -> None:
    """Three processes of 120 MiB each, far under their rlimit of 1 GiB, pass 256 MiB
    together: the whole job is killed, and the detail says why."""
    code = """
import os, time
children = []
for _ in range(3):
    pid = os.fork()
    if pid == 0:
        held = b"x" * (120 * 2**20)  # written, so resident
        print("holding", len(held) >> 20, "MiB", flush=True)
        time.sleep(15)
        os._exit(0)
    children.append(pid)
for pid in children:
    os.waitpid(pid, 0)
print("all survived", flush=True)
"""
    limits = Limits(wall_seconds=30, memory_bytes=2**30, total_memory_bytes=256 * 2**20)
    result = run_python(code, tmp_path, sandbox=sandbox, limits=limits)
    assert (result.status, result.returncode) == ("killed", -9), result
    assert result.detail == (
        "killed: the job's processes together passed the memory limit of 0.25 GiB"
    )
    assert "all survived" not in result.output
    assert result.peak_memory_bytes is not None and result.peak_memory_bytes > 200 * 2**20
    assert job_cgroups_left() == []


@needs_cgroup
def test_unsandboxed_processes_that_leave_the_process_group_die_with_the_job(
    tmp_path: Path,
) -> None:
    """Without the sandbox's pid namespace, the cgroup still kills all the run started."""
    marker = f"mergearena-escapee-{secrets.token_hex(6)}"
    code = """
import subprocess, sys
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", sys.argv[1]],
                 start_new_session=True)
print("started", flush=True)
"""
    result = run_python(code, tmp_path, marker, sandbox=False)
    assert result.status == "ok", result.output
    assert wait_until_gone(marker) == []
    assert job_cgroups_left() == []


NEIGHBOUR_PROBE = """
import json, os, signal, sys
worker, other = int(sys.argv[1]), sys.argv[2]
found = {}
for name, attempt in (
    ("signal the worker", lambda: os.kill(worker, signal.SIGCONT)),
    ("probe the worker", lambda: os.kill(worker, 0)),
    ("read the worker's environ", lambda: open(f"/proc/{worker}/environ", "rb").read()),
    ("list another job", lambda: os.listdir(other)),
    ("read another job's file", lambda: open(os.path.join(other, "secret.txt")).read()),
):
    try:
        found[name] = f"allowed: {attempt()!r}"[:80]
    except OSError as error:
        found[name] = type(error).__name__
print(json.dumps(found))
"""


@needs_sandbox
def test_a_job_cannot_signal_the_worker_or_read_its_environ_or_another_job(
    tmp_path: Path, monkeypatch
) -> None:
    """Jobs laid out as the worker lays them out (each in its own 0700 directory under the
    scratch dir, the work folder given to the sandbox user): from one, the worker's process and
    the other job do not exist or cannot be reached."""
    monkeypatch.setenv("MERGEARENA_WORKER_SECRET", "SECRET-ENV")
    scratch = tmp_path / "jobs"
    scratch.mkdir()
    mine, other = (Path(tempfile.mkdtemp(prefix="job-", dir=scratch)) for _ in range(2))
    (other / "work").mkdir()
    (other / "work" / "secret.txt").write_text("SECRET-JOB")
    if os.geteuid() == 0:
        sandbox_module._give_to_sandbox_user(other / "work")  # as the worker leaves it
    result = run_python(NEIGHBOUR_PROBE, mine, str(os.getpid()), str(other / "work"))
    assert result.status == "ok", result.output
    found = json.loads(result.output.strip().splitlines()[-1])
    assert not any(outcome.startswith("allowed") for outcome in found.values()), found
    assert "SECRET" not in result.output


# ------------------------------------------------------------------------- a job's capped work area

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a work area needs root")


def mounts_under(directory: Path) -> list[str]:
    """Mount points at or below ``directory``, as this process's mount table has them."""
    table = Path("/proc/self/mounts").read_text().splitlines()
    return [line.split()[1] for line in table if line.split()[1].startswith(str(directory))]


def fill(directory: Path, limit: int) -> tuple[int, int | None]:
    """Write 1 MiB blocks into ``directory`` until an error or ``limit`` bytes (a bound, so that
    a cap that failed cannot fill the host's disk): (bytes written, errno or None)."""
    written = 0
    try:
        with open(directory / "fill", "wb") as handle:
            while written < limit:
                handle.write(b"x" * 2**20)
                handle.flush()
                written += 2**20
    except OSError as error:
        return written, error.errno
    return written, None


@needs_root
@pytest.mark.parametrize("mkfs", [True, False], ids=["ext4-image", "tmpfs"])
def test_a_work_area_stops_writes_at_its_cap_and_leaves_no_mount_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mkfs: bool
) -> None:
    """Disk-backed where mkfs.ext4 is there, RAM-backed where not; full, it says so; after the
    block (an error in it too) nothing stays mounted and the image is gone."""
    from mergearena.arena import workarea

    if not mkfs:
        monkeypatch.setattr(workarea.shutil, "which", lambda name: None)
    elif shutil.which("mkfs.ext4") is None:
        pytest.skip("mkfs.ext4 is missing (apt-get install e2fsprogs)")
    with pytest.raises(RuntimeError, match="the job crashed"):
        with workarea.work_area(tmp_path / "work", 16 * 2**20) as area:
            assert mounts_under(tmp_path) == [str(tmp_path / "work")]
            assert not area.is_full()
            written, error = fill(area.path, 64 * 2**20)
            assert error == errno.ENOSPC and written <= 16 * 2**20
            assert area.is_full() and area.full_message() == (
                "the job's work area of 0.015625 GiB is full"
            )
            raise RuntimeError("the job crashed")
    kind = "a loop-mounted ext4 image" if mkfs else "a tmpfs, in RAM (no disk image: mkfs.ext4"
    assert area.description.startswith(f"work area: 0.015625 GiB, {kind}"), area.description
    assert mounts_under(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]  # the image removed
    assert list((tmp_path / "work").iterdir()) == []  # what was written went with the mount


@needs_root
def test_a_work_area_still_busy_is_unmounted_lazily(tmp_path: Path) -> None:
    """A process left in the area (its working directory there) does not keep it mounted."""
    from mergearena.arena import workarea

    with workarea.work_area(tmp_path / "work", 16 * 2**20) as area:
        sleeper = subprocess.Popen(["sleep", "60"], cwd=area.path)  # noqa: S603, S607
    try:
        assert mounts_under(tmp_path) == []
    finally:
        sleeper.kill()
        sleeper.wait()


def test_without_root_the_work_area_is_said_to_be_uncapped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mergearena.arena import workarea

    monkeypatch.setattr(workarea.os, "geteuid", lambda: 1000)
    with workarea.work_area(tmp_path / "work", 2**30) as area:
        assert area.size_bytes is None and not area.is_full()
    assert area.description == (
        "work area: not capped (a file system of its own needs root to mount; this worker runs "
        f"as uid 1000): a job can fill the disk of {tmp_path}"
    )


def test_the_work_area_holds_the_largest_merged_model_the_competition_admits() -> None:
    from mergearena.arena.workarea import DEFAULT_BYTES, work_area_bytes

    assert work_area_bytes(8 * 10**9) == 32 * 10**9 + 4 * 2**30  # float32 at most, and room
    assert work_area_bytes(None) == DEFAULT_BYTES


@needs_root
def test_work_areas_of_a_worker_killed_mid_job_are_unmounted_by_the_next(tmp_path: Path) -> None:
    """A worker killed mid-job runs no ``finally``: the next worker to start unmounts and removes
    what it left, and leaves the jobs of running workers (its own pid's) alone."""
    from mergearena.arena import workarea

    dead = tmp_path / f"{workarea.JOB_PREFIX}7-w999999999-abcd"  # above any pid_max
    alive = tmp_path / f"{workarea.job_folder_prefix(8)}efgh"
    entered = []  # held, so that no finally runs when they are collected: as if killed
    for folder in (dead, alive):
        folder.mkdir()
        entered.append(workarea.work_area(folder / "work", 16 * 2**20))
        entered[-1].__enter__()
    try:
        assert mounts_under(tmp_path) == [str(dead / "work"), str(alive / "work")]
        assert workarea.remove_abandoned_jobs(tmp_path) == [dead]
        assert mounts_under(tmp_path) == [str(alive / "work")]
        assert sorted(tmp_path.iterdir()) == [alive]
    finally:
        workarea.unmount(alive / "work")
