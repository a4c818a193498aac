"""`mergearena serve --demo` on the prepared zoo: a competition with scored baselines."""

from __future__ import annotations

from pathlib import Path

import pytest

from mergearena.arena import service
from mergearena.arena.db import open_database
from mergearena.arena.demo import DEMO_SLUG, seed_demo
from mergearena.zoo.tasks import TASK_NAMES, tasks_dir

pytestmark = [pytest.mark.zoo, pytest.mark.slow]


@pytest.fixture(autouse=True)
def _needs_prepared_zoo() -> None:
    if not (tasks_dir() / "manifest.json").is_file():
        pytest.skip("the zoo is not prepared: run `mergearena zoo prepare`")


def test_the_demo_competition_comes_with_scored_baselines(tmp_path: Path) -> None:
    sessions = open_database(f"sqlite:///{tmp_path / 'arena.db'}")
    said: list[str] = []
    assert seed_demo(sessions, tmp_path, examples=3, say=said.append) == DEMO_SLUG
    with sessions() as session:
        competition = service.get_competition(session, DEMO_SLUG)
        assert [p.name for p in competition.phases] == ["validation", "public-test", "final"]
        assert {t.name for t in competition.phases[0].tasks} == set(TASK_NAMES)
        for phase in competition.phases[:2]:
            rows = service.leaderboard(session, phase)
            assert {r.name for r in rows} == {"base model", "task-arithmetic"}, said
            assert all(r.baseline and r.average is not None for r in rows)
    # a second start reuses it and scores nothing again
    assert seed_demo(sessions, tmp_path, examples=3, say=said.append) == DEMO_SLUG
    assert sum("scoring" in line for line in said) == 1
