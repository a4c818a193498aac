"""`mergearena serve --demo`: a competition over the zoo's tasks with scored baselines.

The first start prepares the zoo, creates the competition (validation, public test and final
phases over the zoo's validation and test splits), and runs the baseline submissions through a
worker before the server opens, so the leaderboard is live at once. Later starts reuse it.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from mergearena.arena import service
from mergearena.arena.db import Competition
from mergearena.arena.worker import WorkerSettings, run_worker

DEMO_SLUG = "zoo"
BASE_RECIPE = """\
# The base model alone: the floor every merge should beat.
merge_method: passthrough
models:
  - model: zoo:smollm2-135m
"""


def _subset(path: Path, start: int, count: int) -> bytes:
    """Rows ``start`` to ``start + count`` of a task file, with its header."""
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(rows[0])
    writer.writerows(rows[1 + start : 1 + start + count])
    return out.getvalue().encode()


def seed_demo(
    sessions: sessionmaker,
    data_dir: Path,
    *,
    examples: int = 40,
    recipes: list[Path] | None = None,
    worker: WorkerSettings | None = None,
    say: Callable[[str], None] = print,
) -> str:
    """Create the demo competition if it is missing and score its baselines; returns its slug."""
    from mergearena.evaluation.tasks import load_settings
    from mergearena.zoo.leaderboard import default_recipes
    from mergearena.zoo.prepare import prepare, task_files

    with sessions() as session:
        if session.scalar(select(Competition).where(Competition.slug == DEMO_SLUG)):
            return DEMO_SLUG
    prepare()
    if recipes is None:  # the tuned default: task arithmetic
        recipes = [p for p in default_recipes() if p.stem == "zoo-task-arithmetic"]
    with sessions() as session:
        competition = service.create_competition(
            session,
            service.CompetitionSpec(
                slug=DEMO_SLUG,
                name="The mergearena zoo",
                rules=(
                    "Merge the zoo's five LoRA experts (sentiment, question type, spam, "
                    "arithmetic, MMLU subject) into SmolLM2-135M-Instruct so the merge does well "
                    "on all six zoo tasks. Models: zoo:* only. Submit a recipe or code."
                ),
                allowed_models=["zoo:*"],
                max_parameters=1_000_000_000,
                time_limit_seconds=1800,
                daily_submissions=5,
            ),
        )
        layout = [
            ("validation", "validation", "validation", 0),
            ("public-test", "public_test", "test", 0),
            ("final", "final", "test", examples),
        ]
        for name, kind, split, start in layout:
            phase = service.add_phase(session, competition, name, kind)
            for path in task_files(split):
                task_settings = load_settings(path.with_suffix(".yaml"))
                service.add_task(
                    session,
                    data_dir,
                    phase,
                    path.stem,
                    _subset(path, start, examples),
                    task_settings.model_dump(mode="json", exclude_defaults=True),
                )
        team = service.baseline_team(session)
        entries = [("base model", "base.yaml", BASE_RECIPE.encode())]
        entries += [(p.stem.removeprefix("zoo-"), p.name, p.read_bytes()) for p in recipes]
        for phase in competition.phases[:2]:
            for name, file_name, content in entries:
                service.submit(session, data_dir, team, phase, name, file_name, content)
        session.commit()
    settings = worker or WorkerSettings(data_dir=data_dir)
    say(f"scoring {2 * len(entries)} baseline submissions (first start only) ...")
    run_worker(
        sessions,
        settings,
        until_empty=True,
        report=lambda s: say(
            f"  {s.phase.name}: {s.name}: {s.status}"
            + (f", average {100 * s.average:.1f}" if s.average is not None else f" ({s.error})")
        ),
    )
    return DEMO_SLUG
