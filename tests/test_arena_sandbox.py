"""The sandbox, attacked from inside by tiny Python programs: network, hidden files, writes outside
the workdir, the environment, the wall limit, output floods, fork bombs, memory, file size, CPU.

Tests marked with both modes also pin that ``sandbox=False`` keeps the same environment, limits,
timeout and output cap.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import sys
import time
from pathlib import Path

import pytest

from mergearena.arena import sandbox as sandbox_module
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


@needs_sandbox
@pytest.mark.skipif(os.geteuid() != 0, reason="the uid drop happens only when run as root")
def test_root_only_files_cannot_be_read(tmp_path: Path) -> None:
    """As root, the command runs as nobody: root's 0600 files stay closed, /etc/shadow too."""
    shared = tmp_path / "shared"
    shared.mkdir()
    private = shared / "root-only.txt"
    private.write_text("SECRET")
    private.chmod(0o600)

    result = run_python(READ_PROBE, tmp_path, str(private), "/etc/shadow", readonly=[shared])

    assert f"{private} failed PermissionError" in result.output
    assert "/etc/shadow failed PermissionError" in result.output


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


@needs_sandbox
def test_fork_bomb_is_bounded(tmp_path: Path) -> None:
    """RLIMIT_NPROC binds because the command does not run as root (see the module docstring).
    The bomb limits itself too, so that a failure of the limit cannot harm the machine."""
    code = """
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
    result = run_python(code, tmp_path, limits=Limits(wall_seconds=10, processes=32))
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
