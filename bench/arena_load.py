"""Arena under load: many teams upload at once while someone reads the board.

    python bench/arena_load.py [--db URL] [--uploads 64] [--parallel 8] [--teams 8]
                               [--board-rate 10] [--max-seconds 120]

Starts ``mergearena serve`` in a subprocess on 127.0.0.1 (a free port, a throwaway data
directory; SQLite there by default, or ``--db postgresql+psycopg://...``, which should be a
throwaway database too: the bench adds a competition and teams to it). It seeds a competition
whose daily limit the uploads stay under, then sends ``--uploads`` recipe uploads from
``--teams`` teams, ``--parallel`` at a time, while one client reads ``/api/leaderboard`` at
``--board-rate`` per second until the uploads are done. Everything is bounded: the count of
uploads, ``--max-seconds`` for the whole run (later uploads are skipped), 60 s per request.

It prints the p50 / p99 / max latency of the board reads and of the uploads, and how many of
each answered with which status (``timeout``: no answer within 60 s). Only loopback traffic.
"""

from __future__ import annotations

import argparse
import math
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx

RECIPE = """merge_method: linear
models:
  - model: zoo:sentiment
    parameters: {weight: 1.0}
  - model: zoo:spam
    parameters: {weight: 1.0}
"""
REQUEST_TIMEOUT = 60.0


@dataclass
class Timings:
    """Latencies (seconds) and outcomes (an HTTP status, or "timeout") of one kind of request."""

    seconds: list[float] = field(default_factory=list)
    outcomes: Counter = field(default_factory=Counter)
    samples: dict[str, str] = field(default_factory=dict)  # an answer's text per error status
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, started: float, outcome: int | str, text: str = "") -> None:
        with self.lock:
            self.seconds.append(time.perf_counter() - started)
            self.outcomes[str(outcome)] += 1
            if outcome == "timeout" or outcome >= 400:
                self.samples.setdefault(str(outcome), text[:300])


def percentile(values: list[float], share: float) -> float:
    """The nearest-rank percentile (``share`` in 0..1) of ``values``."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def seed(url: str, data_dir: Path, teams: int, per_team: int) -> tuple[str, list[str]]:
    """A competition with one open phase and ``teams`` teams; returns its slug and the tokens."""
    from mergearena.arena import service
    from mergearena.arena.db import open_database

    slug = f"load-{secrets.token_hex(3)}"
    sessions = open_database(url)
    with sessions() as session:
        spec = service.CompetitionSpec(
            slug=slug, name="Load", allowed_models=["zoo:*"], daily_submissions=per_team
        )
        service.add_phase(session, service.create_competition(session, spec), "open", "validation")
        tokens = [service.register_team(session, f"{slug} team {k}")[1] for k in range(teams)]
        session.commit()
    sessions.kw["bind"].dispose()
    return slug, tokens


def start_server(url: str, data_dir: Path, port: int) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "mergearena", "serve", "--db", url, "--data-dir", str(data_dir),
        "--host", "127.0.0.1", "--port", str(port), "--no-worker",
        "--organizer-token", secrets.token_urlsafe(16),
    ]  # fmt: skip
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited: {server.stderr.read().decode()[-2000:]}")
        try:
            httpx.get(f"http://127.0.0.1:{port}/api/competitions", timeout=2)
            return server
        except httpx.HTTPError:
            time.sleep(0.2)
    server.terminate()
    raise SystemExit("the server did not answer within 120 s")


def read_board(base: str, slug: str, rate: float, done: threading.Event, board: Timings) -> None:
    """Read the board every 1/rate seconds (at once when a read took longer) until ``done``."""
    with httpx.Client(timeout=REQUEST_TIMEOUT) as client:
        next_read = time.perf_counter()
        while not done.is_set():
            started = time.perf_counter()
            try:
                answer = client.get(f"{base}/api/leaderboard", params={"competition": slug})
                board.record(started, answer.status_code, answer.text)
            except httpx.TimeoutException:
                board.record(started, "timeout")
            next_read += 1 / rate
            done.wait(max(0.0, next_read - time.perf_counter()))


def upload(base: str, slug: str, token: str, name: str, deadline: float, uploads: Timings) -> None:
    if time.perf_counter() > deadline:
        return  # past --max-seconds: skipped, not counted
    started = time.perf_counter()
    try:
        answer = httpx.post(
            f"{base}/api/submissions",
            data={"name": name, "competition": slug},
            files={"file": ("recipe.yaml", RECIPE.encode())},
            headers={"Authorization": f"Bearer {token}"},
            timeout=REQUEST_TIMEOUT,
        )
        uploads.record(started, answer.status_code, answer.text)
    except httpx.TimeoutException:
        uploads.record(started, "timeout")


def row(label: str, timings: Timings) -> str:
    if not timings.seconds:
        return f"| {label} | 0 | - | - | - | - |"
    ms = [1000 * s for s in timings.seconds]
    statuses = ", ".join(f"{k}: {v}" for k, v in sorted(timings.outcomes.items()))
    return (
        f"| {label} | {len(ms)} | {percentile(ms, 0.5):.0f} ms | {percentile(ms, 0.99):.0f} ms "
        f"| {max(ms):.0f} ms | {statuses} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", help="database URL (default: SQLite in a throwaway directory)")
    parser.add_argument("--uploads", type=int, default=64)
    parser.add_argument("--parallel", type=int, default=8)
    parser.add_argument("--teams", type=int, default=8)
    parser.add_argument("--board-rate", type=float, default=10.0, help="board reads per second")
    parser.add_argument("--max-seconds", type=float, default=120.0)
    args = parser.parse_args()

    data_dir = Path(tempfile.mkdtemp(prefix="arena-load-"))
    url = args.db or f"sqlite:///{data_dir / 'arena.db'}"
    slug, tokens = seed(url, data_dir, args.teams, math.ceil(args.uploads / args.teams))
    port = free_port()
    server = start_server(url, data_dir, port)
    base = f"http://127.0.0.1:{port}"
    board, uploads = Timings(), Timings()
    done = threading.Event()
    reader = threading.Thread(target=read_board, args=(base, slug, args.board_rate, done, board))
    try:
        started = time.perf_counter()
        deadline = started + args.max_seconds
        reader.start()
        with ThreadPoolExecutor(args.parallel) as pool:
            for k in range(args.uploads):
                token = tokens[k % len(tokens)]
                pool.submit(upload, base, slug, token, f"u{k}", deadline, uploads)
        done.set()
        reader.join()
        wall = time.perf_counter() - started
    finally:
        done.set()
        server.terminate()
        server.wait(timeout=30)
    database = "PostgreSQL" if url.startswith("postgresql") else "SQLite (WAL)"
    print(
        f"{database}: {args.uploads} uploads from {args.teams} teams, {args.parallel} at a time, "
        f"board read {args.board_rate:g}/s; {wall:.1f} s"
    )
    print("| requests | count | p50 | p99 | max | answers |")
    print("|---|---|---|---|---|---|")
    print(row("board reads (`GET /api/leaderboard`)", board))
    print(row("uploads (`POST /api/submissions`)", uploads))
    for label, timings in (("board read", board), ("upload", uploads)):
        for status, text in sorted(timings.samples.items()):
            print(f"a {label} answered {status}: {text}")


if __name__ == "__main__":
    main()
