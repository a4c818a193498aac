"""The system calls a sandboxed job is refused: a seccomp filter that bubblewrap installs
(``bwrap --seccomp FD``) just before the command starts, built with libseccomp through its
Python bindings' API (``pyseccomp``).

Every call is allowed except, each failing with ``EPERM`` (``ENOSYS`` for ``clone3``):

- ``socket`` for any family but ``AF_UNIX``: no inet, raw or packet sockets, even on the sandbox's
  own loopback (the network namespace already cuts the outside off);
- tracing and reading other processes (``ptrace``, ``process_vm_readv``/``writev``), keyrings,
  ``bpf``, ``perf_event_open``, ``userfaultfd``, file-handle opens, kernel modules, ``kexec``,
  reboot, swap, mounts and the new mount API, ``chroot``/``pivot_root``;
- new namespaces: ``unshare``, ``setns``, and ``clone`` with any ``CLONE_NEW*`` flag. ``clone3``
  passes its flags in memory a filter cannot read, so it answers ``ENOSYS``, and the C library
  falls back to ``clone`` (threads and processes keep working).

System calls of another architecture (32-bit calls from a 64-bit process) kill the process, as
libseccomp's filters do by default.
"""

from __future__ import annotations

import errno
import functools
import socket
import tempfile

REFUSED = (
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "kcmp",
    "keyctl",
    "add_key",
    "request_key",
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "open_by_handle_at",
    "name_to_handle_at",
    "init_module",
    "finit_module",
    "delete_module",
    "kexec_load",
    "kexec_file_load",
    "reboot",
    "swapon",
    "swapoff",
    "acct",
    "quotactl",
    "mount",
    "umount2",
    "pivot_root",
    "chroot",
    "move_mount",
    "open_tree",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "mount_setattr",
    "unshare",
    "setns",
)
# CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID,
# CLONE_NEWNET (linux/sched.h)
NAMESPACE_FLAGS = (
    0x00020000,
    0x02000000,
    0x04000000,
    0x08000000,
    0x10000000,
    0x20000000,
    0x40000000,
)


@functools.cache
def seccomp_program() -> tuple[bytes | None, str]:
    """The filter as a BPF program for ``bwrap --seccomp``, and a line saying what it refuses;
    or None and why there is none (libseccomp missing)."""
    try:
        import pyseccomp as seccomp

        refuse = seccomp.ERRNO(errno.EPERM)
        rules = seccomp.SyscallFilter(seccomp.ALLOW)
        rules.add_rule(refuse, "socket", seccomp.Arg(0, seccomp.NE, socket.AF_UNIX))
        for flag in NAMESPACE_FLAGS:
            rules.add_rule(refuse, "clone", seccomp.Arg(0, seccomp.MASKED_EQ, flag, flag))
        rules.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")
        refused = []
        for name in REFUSED:
            try:
                rules.add_rule(refuse, name)
            except (RuntimeError, ValueError, OSError):
                continue  # a call this libseccomp does not know: no process can make it either
            refused.append(name)
        with tempfile.TemporaryFile() as program:
            rules.export_bpf(program)
            program.seek(0)
            code = program.read()
    except (ImportError, OSError, RuntimeError, ValueError) as error:
        return None, f"seccomp filter: not in force ({type(error).__name__}: {error})"
    return code, (
        f"seccomp filter: in force (sockets but AF_UNIX, clone into new namespaces, clone3 and "
        f"{len(refused)} more system calls refused: tracing, mounts, keyrings, bpf, modules...)"
    )
