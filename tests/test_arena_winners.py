"""The competition's winning approaches as arena submissions, scored end to end by the sandboxed
worker on rows of the zoo: the winners' recipes as recipes, the two whose winners wrote their own
inference as starter-kit archives (recipes/winners/kits/), and routed LoRA experts as a routed
model. Each is queued, claimed, run in the sandbox and scored against hidden targets."""

from __future__ import annotations

import csv
import io
import shutil
import tarfile
from pathlib import Path

import pytest

from mergearena.arena import service
from mergearena.arena.db import open_database
from mergearena.arena.sandbox import sandbox_available
from mergearena.arena.worker import WorkerSettings, work_once

pytestmark = [
    pytest.mark.zoo,
    pytest.mark.slow,
    pytest.mark.skipif(
        sandbox_available() is not None, reason=f"no sandbox here: {sandbox_available()}"
    ),
]
REPO = Path(__file__).resolve().parents[1]
WINNERS = REPO / "recipes" / "winners"
EXPERTS = ["arithmetic", "question_type", "sentiment", "spam", "subject"]
ROWS = {"sentiment": 4, "spam": 4, "arithmetic": 3}  # two multiple-choice tasks, one generation


def _first_rows(path: Path, count: int) -> bytes:
    with path.open(newline="") as handle:
        rows = list(csv.reader(handle))[: count + 1]
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue().encode()


def _archive(directory: Path, extra: dict[str, Path] | None = None) -> bytes:
    """``directory``'s contents as a .tar.gz, plus ``extra`` files (archive name → file)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for path in sorted(directory.iterdir()):
            archive.add(path, arcname=path.name, filter=_no_caches)
        for name, path in (extra or {}).items():
            archive.add(path, arcname=name)
    return buffer.getvalue()


def _no_caches(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    return None if "__pycache__" in info.name else info


def kit(name: str) -> bytes:
    """recipes/winners/kits/NAME packed as its README says: with recipes/winners/NAME.yaml as
    llm_merging/merging/recipe.yaml."""
    recipe = {"llm_merging/merging/recipe.yaml": WINNERS / f"{name}.yaml"}
    return _archive(WINNERS / "kits" / name, recipe)


@pytest.fixture(scope="module")
def zoo_arena(tmp_path_factory):
    from mergearena.checkpoints.refs import model_ref_exists
    from mergearena.zoo.prepare import task_files

    if not model_ref_exists("zoo:smollm2-135m"):
        pytest.skip("the zoo is not prepared: run `mergearena zoo prepare`")
    root = tmp_path_factory.mktemp("winners-arena")
    data_dir = root / "data"
    sessions = open_database(f"sqlite:///{root / 'arena.db'}")
    allowed = ["zoo:smollm2-135m", "zoo:question_type", "zoo:sentiment", "zoo:*-lora"]
    with sessions() as session:
        competition = service.create_competition(
            session,
            service.CompetitionSpec(
                slug="winners",
                name="Winners on the zoo",
                allowed_models=allowed,
                time_limit_seconds=900,
                memory_limit_bytes=None,
                daily_submissions=100,
            ),
        )
        phase = service.add_phase(session, competition, "validation", "validation")
        for task, path in zip(ROWS, task_files("validation", list(ROWS)), strict=True):
            sidecar = {"max_new_tokens": 8} if task == "arithmetic" else None
            service.add_task(session, data_dir, phase, task, _first_rows(path, ROWS[task]), sidecar)
        service.register_team(session, "winners")
        session.commit()
    settings = WorkerSettings(data_dir=data_dir, dtype="float32", scratch_dir=root / "jobs")

    def score(file_name: str, content: bytes):
        with sessions() as session:
            phase = service.get_phase(service.get_competition(session, "winners"))
            team = session.query(service.Team).one()
            service.submit(session, data_dir, team, phase, file_name, file_name, content)
            session.commit()
        done = work_once(sessions, settings)
        assert done is not None
        assert done.status == "scored", (done.error, done.log)
        assert set(done.scores) == set(ROWS)
        return done

    return score


@pytest.mark.parametrize(
    "recipe",
    [
        WINNERS / "geometric-median-qv.yaml",  # creative write-up
        WINNERS / "geometric-median-all.yaml",
        REPO / "recipes" / "zoo-searched.yaml",  # 3rd place's family: a searched DARE/TIES merge
    ],
    ids=lambda p: p.stem,
)
def test_a_winners_recipe_is_scored_by_the_sandboxed_worker(zoo_arena, recipe: Path) -> None:
    done = zoo_arena(recipe.name, recipe.read_bytes())
    assert done.kind == "recipe" and "the submission's own code" not in done.log


@pytest.mark.parametrize(
    ("name", "method"),
    [
        ("slerp-2nd-place", "SimpleLlamaMerge"),  # SLERP gradients + chain of thought
        ("dare-ties-efficiency", "DareTiesFewShot"),  # DARE-TIES + few-shot prompts
    ],
)
def test_a_winners_starter_kit_runs_its_own_inference_in_the_sandbox(
    zoo_arena, name: str, method: str
) -> None:
    done = zoo_arena(f"{name}.tar.gz", kit(name))
    assert done.kind == "code"
    for task, rows in ROWS.items():
        hook = "generate" if task == "arithmetic" else "predict_multiple_choice"
        line = f"predicted {task}: {rows} rows by {method}.{hook} (the submission's own code)"
        assert line in done.log, done.log


def test_routed_lora_experts_are_scored_as_a_routed_model(zoo_arena, tmp_path: Path) -> None:
    """The 1st place's family: the five experts beside the base, chosen per prompt."""
    from mergearena.routed.build import build_routed
    from mergearena.zoo.prepare import task_files

    out = tmp_path / "routed"
    build_routed(
        "zoo:smollm2-135m",
        [f"zoo:{expert}-lora" for expert in EXPERTS],
        out,
        router="prompt",
        calibration=task_files("train", EXPERTS),
        calibration_rows=4,
    )
    done = zoo_arena("routed.tar.gz", _archive(out))
    assert done.kind == "routed"
    assert "merged with routed (prompt router, 5 experts)" in done.log, done.log
    shutil.rmtree(out)
