"""Arena throughput: leaderboard response time at 10,000 scored submissions, and how many recipe
submissions one worker scores per minute on the zoo.

    python bench/arena_bench.py leaderboard [--submissions 10000] [--db URL]
    python bench/arena_bench.py worker [--submissions 3] [--examples 40]

There is no reference tool to run beside it: Codabench needs its Django/Celery/RabbitMQ stack and
network services, so the figures are absolute (median of repeated requests; jobs per minute).
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path


def bench_leaderboard(submissions: int, url: str | None, repeats: int) -> None:
    from fastapi.testclient import TestClient
    from sqlalchemy import insert

    from mergearena.arena import service
    from mergearena.arena.db import Submission, Team, open_database, utcnow
    from mergearena.arena.web import ArenaSettings, create_app

    data_dir = Path(tempfile.mkdtemp(prefix="arena-bench-"))
    sessions = open_database(url or f"sqlite:///{data_dir / 'arena.db'}")
    tasks = ["sentiment", "question_type", "spam", "arithmetic", "subject", "mmlu"]
    header = b"id,input,target,answer_choices,eval_type\n"
    with sessions() as session:
        competition = service.create_competition(
            session, service.CompetitionSpec(slug="bench", name="Bench")
        )
        phase = service.add_phase(session, competition, "validation", "validation")
        for name in tasks:
            row = b"1,x,0,\"['a', 'b']\",multiple_choice\n"
            service.add_task(session, data_dir, phase, name, header + row)
        teams = max(1, submissions // 10)
        session.execute(
            insert(Team),
            [{"name": f"team {k}", "token_sha256": f"{k:064x}"} for k in range(teams)],
        )
        team_ids = [t.id for t in session.query(Team).all()]
        rng = random.Random(0)
        now = utcnow()
        rows = []
        for k in range(submissions):
            scores = {t: rng.random() for t in tasks}
            rows.append(
                {
                    "phase_id": phase.id,
                    "team_id": team_ids[k % len(team_ids)],
                    "name": f"submission {k}",
                    "kind": "recipe",
                    "file_name": "recipe.yaml",
                    "file_sha256": "0" * 64,
                    "status": "scored",
                    "attempts": 1,
                    "created_at": now,
                    "average": sum(scores.values()) / len(scores),
                    "scores": scores,
                    "log": "",
                    "disqualified": False,
                }
            )
        session.execute(insert(Submission), rows)
        session.commit()
    client = TestClient(create_app(ArenaSettings(sessions, data_dir, None)))
    for path in ("/c/bench", "/api/leaderboard"):
        client.get(path)  # warm up: templates, query plans
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            response = client.get(path)
            times.append(time.perf_counter() - started)
            assert response.status_code == 200, response.text
        print(
            f"{path}: {submissions} scored submissions from {teams} teams: median "
            f"{1000 * statistics.median(times):.1f} ms, max {1000 * max(times):.1f} ms "
            f"over {repeats} requests"
        )


def bench_worker(submissions: int, examples: int) -> None:
    from mergearena.arena import service
    from mergearena.arena.db import open_database
    from mergearena.arena.demo import seed_demo
    from mergearena.arena.worker import WorkerSettings, run_worker

    data_dir = Path(tempfile.mkdtemp(prefix="arena-bench-"))
    sessions = open_database(f"sqlite:///{data_dir / 'arena.db'}")
    started = time.perf_counter()
    seed_demo(sessions, data_dir, examples=examples, recipes=[], say=lambda _m: None)
    print(f"demo competition with base-model baselines: {time.perf_counter() - started:.1f} s")
    lambdas = [0.3 + 0.1 * k for k in range(submissions)]
    with sessions() as session:
        team, _ = service.register_team(session, "bench", baseline=True)
        phase = service.get_phase(service.get_competition(session, "zoo"), "validation")
        experts = ["arithmetic", "question_type", "sentiment", "spam", "subject"]
        for value in lambdas:
            models = "".join(
                f"  - model: zoo:{e}-lora\n    parameters: {{weight: 1.0}}\n" for e in experts
            )
            recipe = (
                "merge_method: task_arithmetic\nbase_model: zoo:smollm2-135m\n"
                f"models:\n{models}parameters: {{lambda: {value:.1f}}}\n"
                "dtype: float32\nout_dtype: bfloat16\n"
            )
            service.submit(
                session, data_dir, team, phase, f"ta {value:.1f}", "r.yaml", recipe.encode()
            )
        session.commit()
    started = time.perf_counter()
    done = run_worker(sessions, WorkerSettings(data_dir=data_dir), until_empty=True)
    seconds = time.perf_counter() - started
    print(
        f"one worker: {done} recipe submissions (merge 5 LoRA experts, score 6 tasks x "
        f"{examples} examples) in {seconds:.1f} s = {60 * done / seconds:.2f} submissions/minute"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    board = sub.add_parser("leaderboard")
    board.add_argument("--submissions", type=int, default=10_000)
    board.add_argument("--db", default=None, help="database URL (default: a new SQLite file)")
    board.add_argument("--repeats", type=int, default=20)
    worker = sub.add_parser("worker")
    worker.add_argument("--submissions", type=int, default=3)
    worker.add_argument("--examples", type=int, default=40)
    args = parser.parse_args()
    if args.what == "leaderboard":
        bench_leaderboard(args.submissions, args.db, args.repeats)
    else:
        bench_worker(args.submissions, args.examples)


if __name__ == "__main__":
    main()
