"""Time the README's set-up commands in a fresh clone, as a new user and CI run them.

Clones this repository's HEAD into ``--dir`` (``../shared`` linked beside it when this checkout
has one), runs each command there one after another, nothing else in between, and prints
bench/README.md's table (whose times README.md quotes): the command, whether ``.venv/`` existed
before it, its wall time, and the line that says how it ended (pytest's summary, the main job's
verdict). The logs stay in ``--dir``. On an AVX-512 machine, ``--avx2`` emulates the 2-core AVX2
CPUs the README quotes.

    python3 bench/readme_timings.py --dir /tmp/fresh --avx2
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMANDS = ("scripts/demo.sh", "scripts/test.sh", "scripts/demo.sh")
ENDINGS = (re.compile(r"^=* ?\d+ passed.*$"), re.compile(r"^best merge .*$"))


def ending(log: str) -> str:
    """The last line that says how a command ended, or its last line."""
    lines = [line.strip(" =") for line in log.splitlines() if line.strip()]
    found = [line for line in lines if any(p.match(line) for p in ENDINGS)]
    return (found or lines or [""])[-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, required=True, help="where the clone goes (replaced)")
    parser.add_argument("--avx2", action="store_true", help="limit torch and oneDNN to AVX2")
    parser.add_argument("commands", nargs="*", default=list(COMMANDS), help="run with bash")
    args = parser.parse_args(argv)
    clone = args.dir.resolve()
    shutil.rmtree(clone, ignore_errors=True)
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    commit = subprocess.run(
        ["git", "-C", str(clone), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    shared = REPO.parent / "shared"
    if shared.is_dir():
        beside = clone.parent / "shared"
        if beside.is_symlink() or not beside.exists():
            beside.unlink(missing_ok=True)
            beside.symlink_to(shared)
    env = dict(os.environ)
    if args.avx2:
        env.update(ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2")
    rows = []
    for number, command in enumerate(args.commands, start=1):
        state = ".venv/ ready" if (clone / ".venv").exists() else ".venv/ created"
        log_path = clone.parent / f"{clone.name}-{number}-{Path(command).stem}.log"
        started = time.perf_counter()
        with log_path.open("w") as log:
            result = subprocess.run(
                ["bash", command], cwd=clone, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        seconds = time.perf_counter() - started
        minutes, rest = divmod(round(seconds), 60)
        end = ending(log_path.read_text(errors="replace"))
        status = "" if result.returncode == 0 else f" **exit {result.returncode}**"
        rows.append(f"| `bash {command}` | {state} | {minutes} min {rest} s{status} | {end} |")
        print(f"{command}: {seconds:.0f} s, exit {result.returncode}, log {log_path}", flush=True)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"\nfresh clone of {commit}, {cpus} CPUs{', AVX2 emulated' if args.avx2 else ''}:\n")
    print("| command | before it | wall time | how it ended |")
    print("|---|---|---:|---|")
    print("\n".join(rows))
    return 0 if all("**exit" not in row for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
