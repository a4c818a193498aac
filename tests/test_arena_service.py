"""The arena's JSON API, pages and queue against a real SQLite file (FastAPI's test client)."""

from __future__ import annotations

import datetime as dt
import io
import json
import tarfile
import threading
from pathlib import Path

import pytest
from conftest import BOTH_DATABASES, empty_database, serve_in_thread
from fastapi.testclient import TestClient
from sqlalchemy import MetaData, Table, select, text

from mergearena.arena import queue, service, worker
from mergearena.arena.db import (
    VERSION_TABLE,
    Submission,
    Team,
    make_engine,
    migrate,
    open_database,
    utcnow,
)
from mergearena.arena.runner import load_job
from mergearena.arena.web import ArenaSettings, create_app

ORGANIZER = {"Authorization": "Bearer organizer-secret"}
# The test client posts as a browser on the arena's own pages would: saying where it comes from.
SAME_ORIGIN = {"Origin": "http://testserver"}
HEAD = "0007"  # the schema revision a fresh or upgraded arena database is at
MC_TASK = (
    b"id,input,target,answer_choices,eval_type\n"
    b"1,good film,0,\"['positive', 'negative']\",multiple_choice\n"
    b"2,bad film,1,\"['positive', 'negative']\",multiple_choice\n"
)
RECIPE = b"""merge_method: linear
models:
  - model: zoo:sentiment
    parameters: {weight: 1.0}
  - model: zoo:spam
    parameters: {weight: 1.0}
"""


@pytest.fixture(params=BOTH_DATABASES)
def database_url(request, tmp_path: Path) -> str:
    return empty_database(request.param, tmp_path)


@pytest.fixture()
def arena(tmp_path: Path, database_url: str):
    sessions = open_database(database_url)
    app = create_app(ArenaSettings(sessions, tmp_path, "organizer-secret"))
    client = TestClient(app, headers=SAME_ORIGIN)
    created = client.post(
        "/api/competitions",
        json={"slug": "demo", "name": "Demo", "allowed_models": ["zoo:*"], "daily_submissions": 2},
        headers=ORGANIZER,
    )
    assert created.status_code == 201, created.text
    for phase in ("validation", "final"):
        added = client.post(
            f"/api/competitions/demo/phases/{phase}/tasks",
            data={"name": "sentiment"},
            files={"file": ("sentiment.csv", MC_TASK)},
            headers=ORGANIZER,
        )
        assert added.status_code == 201, added.text
    return client, sessions


def _team(client: TestClient, name: str) -> dict[str, str]:
    response = client.post("/api/teams", json={"name": name})
    assert response.status_code == 201, response.text
    return {"Authorization": f"Bearer {response.json()['token']}"}


def _submit(client: TestClient, headers: dict, name: str = "mine", content: bytes = RECIPE, **form):
    return client.post(
        "/api/submissions",
        data={"name": name, **form},
        files={"file": (form.pop("file_name", "recipe.yaml"), content)},
        headers=headers,
    )


def _score(sessions, submission_id: int, average: float, created: dt.datetime | None = None):
    with sessions() as session:
        submission = session.get(Submission, submission_id)
        submission.status, submission.average = "scored", average
        submission.scores = {"sentiment": average}
        if created is not None:
            submission.created_at = created
        session.commit()


def test_schema_is_migrated_and_sqlite_uses_wal(database_url: str) -> None:
    sessions = open_database(database_url)
    open_database(database_url)  # a second open finds the schema current
    with sessions() as session:
        assert session.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar() == HEAD
        if database_url.startswith("sqlite"):
            assert session.execute(text("PRAGMA journal_mode")).scalar() == "wal"


def test_a_database_versioned_in_alembics_default_table_is_adopted(database_url: str) -> None:
    """Arena databases made before the arena named its own version table keep their revision."""
    engine = make_engine(database_url)
    migrate(engine, "0001")
    with engine.begin() as connection:
        connection.execute(text(f"ALTER TABLE {VERSION_TABLE} RENAME TO alembic_version"))
    engine.dispose()
    sessions = open_database(database_url)  # upgrades from 0001, not from an empty schema
    with sessions() as session:
        assert session.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar() == HEAD
        assert session.execute(text("SELECT count(*) FROM competitions")).scalar() == 0


def test_a_search_study_lives_in_the_arena_database(database_url: str) -> None:
    """`mergearena search --storage URL` with the arena's database: Optuna keeps its own schema
    version beside the arena's, and both open again."""
    import optuna

    open_database(database_url)
    study = optuna.create_study(study_name="s", storage=database_url)
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=2)
    sessions = open_database(database_url)
    again = optuna.load_study(study_name="s", storage=database_url)
    assert len(again.trials) == 2
    with sessions() as session:
        assert session.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar() == HEAD


def test_a_database_of_the_first_schema_is_upgraded_keeping_its_competitions(
    database_url: str,
) -> None:
    engine = make_engine(database_url)
    migrate(engine, "0001")
    with engine.begin() as connection:
        competitions = Table("competitions", MetaData(), autoload_with=connection)
        assert "fewshot" not in competitions.c
        connection.execute(
            competitions.insert().values(
                slug="old",
                name="Old",
                rules="",
                allowed_models=["zoo:*"],
                time_limit_seconds=60,
                daily_submissions=1,
                mc_rule="letter",
                board_mode="best",
                allow_unsandboxed=False,
                created_at=utcnow(),
            )
        )
    engine.dispose()
    sessions = open_database(database_url)
    with sessions() as session:
        assert session.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar() == HEAD
        old = service.get_competition(session, "old")
        # each task's own few-shot examples and CoT settings, as before the upgrade
        assert (old.mc_rule, old.fewshot, old.cot) == ("letter", None, None)
        old.fewshot, old.cot = 1, {"max_new_tokens": 8}
        session.commit()
    with sessions() as session:
        assert service.get_competition(session, "old").cot == {"max_new_tokens": 8}


def test_a_misspelt_competition_setting_is_refused(arena) -> None:
    client, _ = arena
    body = {"slug": "typo", "name": "Typo", "daily_submisions": 3}
    response = client.post("/api/competitions", json=body, headers=ORGANIZER)
    assert response.status_code == 422 and "daily_submisions" in response.text


def test_a_competition_s_inference_strategy_is_stored_shown_and_given_to_its_jobs(
    arena, tmp_path: Path
) -> None:
    client, sessions = arena
    cot = {"max_new_tokens": "256", "fallbacks": ["answer-colon"]}
    body = {"slug": "reasoned", "name": "Reasoned", "mc_rule": "cot", "fewshot": 2, "cot": cot}
    created = client.post("/api/competitions", json=body, headers=ORGANIZER)
    assert created.status_code == 201, created.text
    expected = {"max_new_tokens": 256, "fallbacks": ["answer-colon"]}  # only the keys given
    for document in (created.json(), client.get("/api/competitions/reasoned").json()):
        assert (document["mc_rule"], document["fewshot"], document["cot"]) == ("cot", 2, expected)
    assert client.get("/api/competitions/demo").json()["fewshot"] is None  # each task's own
    # participants see how they are scored
    page = client.get("/c/reasoned").text
    assert "multiple choice by <b>cot</b>" in page and "2 few-shot example(s)" in page
    assert "<code>max_new_tokens</code> 256" in page and "the rest as each task sets them" in page
    demo = client.get("/c/demo").text
    assert "by <b>loglik</b>" in demo and "each task's own few-shot examples" in demo
    # the worker's job file carries the strategy, and the runner reads it back
    added = client.post(
        "/api/competitions/reasoned/phases/validation/tasks",
        data={"name": "sentiment"},
        files={"file": ("sentiment.csv", MC_TASK)},
        headers=ORGANIZER,
    )
    assert added.status_code == 201, added.text  # cot: two of the built-in worked examples
    response = _submit(client, _team(client, "alpha"), competition="reasoned")
    assert response.status_code == 201, response.text
    with sessions() as session:
        submission = session.get(Submission, response.json()["id"])
        settings = worker.WorkerSettings(data_dir=tmp_path)
        (tmp_path / "job").mkdir()
        job, *_ = worker._write_job(settings, submission, tmp_path / "job")
    spec = load_job(job)
    assert (spec.mc_rule, spec.fewshot, spec.cot) == ("cot", 2, expected)


@pytest.mark.parametrize(
    ("strategy", "problem"),
    [
        ({"mc_rule": "cot", "cot": {"max_new_tokens": 0}}, "cot: max_new_tokens: Input should"),
        ({"mc_rule": "cot", "cot": {"paterns": "x"}}, "cot: paterns: Extra inputs"),
        ({"mc_rule": "cot", "cot": {"pattern": "(("}}, "cot: pattern: not a regular expression"),
        ({"mc_rule": "cot", "cot": {"fallbacks": ["guess"]}}, "cot: fallbacks.0: Input should be"),
        ({"cot": {"max_new_tokens": 64}}, "cot settings apply only under mc_rule cot"),
        ({"fewshot": -1}, "fewshot must be 0 or more"),
        ({"mc_rule": "guess"}, "mc_rule 'guess' is not one of"),
    ],
)
def test_a_bad_inference_strategy_is_refused_naming_the_key(arena, strategy, problem) -> None:
    client, _ = arena
    body = {"slug": "bad", "name": "Bad", **strategy}
    response = client.post("/api/competitions", json=body, headers=ORGANIZER)
    assert response.status_code == 400 and problem in response.json()["detail"], response.text


def test_a_task_short_of_the_competition_s_few_shot_examples_is_refused(arena) -> None:
    client, sessions = arena
    body = {"slug": "shots", "name": "Shots", "mc_rule": "letter", "fewshot": 2}
    assert client.post("/api/competitions", json=body, headers=ORGANIZER).status_code == 201
    refused = client.post(
        "/api/competitions/shots/phases/validation/tasks",
        data={"name": "sentiment"},
        files={"file": ("sentiment.csv", MC_TASK)},
        headers=ORGANIZER,
    )
    assert refused.status_code == 400
    detail = refused.json()["detail"]
    assert (
        "task sentiment cannot be asked as this competition sets (mc_rule letter, fewshot 2)"
        in (detail)
        and "no few-shot examples" in detail
    )
    shots = [{"input": "fine film", "output": "positive"}] * 2
    with sessions() as session:  # a task whose sidecar holds two examples is taken
        phase = service.get_phase(service.get_competition(session, "shots"), "validation")
        service.add_task(
            session,
            client.app.state.settings.data_dir,
            phase,
            "sentiment",
            MC_TASK,
            {"fewshot": shots},
        )


def test_the_api_is_documented(arena) -> None:
    client, _ = arena
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/api/submissions", "/api/leaderboard", "/api/teams", "/api/competitions"):
        assert path in paths
    assert client.get("/docs").status_code == 200
    # Every JSON route answers with a documented model, not a bare object.
    for path, methods in paths.items():
        for method, operation in methods.items():
            response = operation["responses"].get("200") or operation["responses"]["201"]
            schema = response["content"]["application/json"]["schema"]
            assert "$ref" in schema or "$ref" in str(schema.get("items", schema)), (method, path)
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    assert {"LeaderboardOut", "PrivateSubmissionOut", "CompetitionOut", "Costs"} <= set(schemas)


def test_a_submission_shows_its_log_only_to_its_team_and_the_organizer(arena) -> None:
    client, sessions = arena
    headers = _team(client, "alpha")
    mine = _submit(client, headers).json()["id"]
    _score(sessions, mine, 0.5)  # public once scored in a phase that shows its scores
    with sessions() as session:
        session.get(Submission, mine).log = "a secret path"
        session.commit()
    for who, sees in (
        (headers, True),
        (ORGANIZER, True),
        (_team(client, "beta"), False),
        ({}, False),
    ):
        shown = client.get(f"/api/submissions/{mine}", headers=who).json()
        assert ("log" in shown) is sees and ("file_sha256" in shown) is sees, who
        assert ("is_final" in shown) is sees, who
        assert shown["team"] == "alpha" and shown["submitted_at"].endswith("Z")


def test_organizer_actions_need_the_organizer_token(arena) -> None:
    client, _ = arena
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        response = client.post(
            "/api/competitions", json={"slug": "x", "name": "X"}, headers=headers
        )
        assert response.status_code == 401
        assert "organizer token" in response.json()["detail"]


def test_task_targets_are_stored_apart_from_inputs(arena, tmp_path: Path) -> None:
    client, sessions = arena
    with sessions() as session:
        competition = service.get_competition(session, "demo")
        task = competition.phases[0].tasks[0]
        inputs = service.blob_path(tmp_path, task.inputs_sha256).read_text()
        assert inputs.splitlines()[0] == "id,input,answer_choices,eval_type"
        assert service.blob_path(tmp_path, task.full_sha256).read_bytes() == MC_TASK


def test_a_task_without_targets_is_refused(arena) -> None:
    client, _ = arena
    response = client.post(
        "/api/competitions/demo/phases/validation/tasks",
        data={"name": "blind"},
        files={"file": ("blind.csv", b"id,input,answer_choices,eval_type\n1,x,,generation\n")},
        headers=ORGANIZER,
    )
    assert response.status_code == 400
    assert "needs a target" in response.json()["detail"]


def test_tokens_are_stored_hashed_shown_once_and_rotate(arena) -> None:
    client, sessions = arena
    headers = _team(client, "alpha")
    token = headers["Authorization"].split()[1]
    with sessions() as session:
        team = session.scalar(select(Team).where(Team.name == "alpha"))
        assert token not in team.token_sha256
    assert client.get("/api/teams/me", headers=headers).json()["team"] == "alpha"
    rotated = client.post("/api/teams/me/token", headers=headers).json()["token"]
    assert client.get("/api/teams/me", headers=headers).status_code == 401
    new = {"Authorization": f"Bearer {rotated}"}
    assert client.get("/api/teams/me", headers=new).json()["team"] == "alpha"


def test_a_team_name_is_taken_once(arena) -> None:
    client, _ = arena
    _team(client, "alpha")
    response = client.post("/api/teams", json={"name": "ALPHA"})
    assert response.status_code == 400
    assert "already exists" in response.json()["detail"]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer ma_wrong"}])
def test_submitting_without_a_valid_token_is_refused(arena, headers) -> None:
    client, sessions = arena
    response = _submit(client, headers)
    assert response.status_code == 401
    with sessions() as session:
        assert session.scalars(select(Submission)).all() == []


def test_a_recipe_is_queued_and_the_upload_stored_by_hash(arena, tmp_path: Path) -> None:
    client, _ = arena
    response = _submit(client, _team(client, "alpha"))
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["status"] == "queued" and body["kind"] == "recipe"
    assert service.blob_path(tmp_path, body["file_sha256"]).read_bytes() == RECIPE


def test_a_recipe_naming_a_model_outside_the_allowlist_is_refused(arena) -> None:
    client, _ = arena
    recipe = RECIPE.replace(b"zoo:spam", b"meta-llama/Llama-3-8B")
    response = _submit(client, _team(client, "alpha"), content=recipe)
    assert response.status_code == 400
    detail = response.json()["detail"]
    assert "meta-llama/Llama-3-8B" in detail and "zoo:*" in detail


def test_each_half_of_a_model_plus_adapter_and_the_tokenizer_source_is_checked(arena) -> None:
    client, _ = arena
    headers = _team(client, "alpha")
    recipe = b"merge_method: linear\nparameters: {weight: 1.0}\nmodels:\n  - model: %s\n"
    accepted = _submit(client, headers, content=recipe % b"zoo:smollm2-135m+zoo:spam-lora")
    assert accepted.status_code == 201, accepted.text
    for refused, content in [
        ("org/adapter", recipe % b"zoo:smollm2-135m+org/adapter"),
        ("org/tokenizer", recipe % b"zoo:spam" + b"tokenizer_source: org/tokenizer\n"),
    ]:
        response = _submit(client, headers, content=content)
        assert response.status_code == 400 and refused in response.json()["detail"], refused


def test_an_invalid_recipe_is_refused_with_the_reason(arena) -> None:
    client, _ = arena
    response = _submit(client, _team(client, "alpha"), content=b"merge_method: nosuch\n")
    assert response.status_code == 400
    assert "nosuch" in response.json()["detail"]


def test_an_oversized_upload_is_refused(arena, monkeypatch) -> None:
    client, sessions = arena
    monkeypatch.setattr(service, "MAX_UPLOAD_BYTES", 1000)
    response = _submit(client, _team(client, "alpha"), content=RECIPE + b"#" * 2000)
    assert response.status_code == 400
    assert "over 1000 bytes" in response.json()["detail"]
    with sessions() as session:
        assert session.scalars(select(Submission)).all() == []


def test_the_daily_limit_names_when_the_next_slot_opens(arena) -> None:
    client, _ = arena
    headers = _team(client, "alpha")
    assert _submit(client, headers, "one").status_code == 201
    assert _submit(client, headers, "two").status_code == 201
    response = _submit(client, headers, "three")
    assert response.status_code == 429
    tomorrow = (utcnow() + dt.timedelta(days=1)).strftime("%Y-%m-%d")
    assert f"next slot opens at {tomorrow} 00:00 UTC" in response.json()["detail"]
    # another team is not affected
    assert _submit(client, _team(client, "beta"), "one").status_code == 201


def test_leaderboard_ranks_by_average_and_breaks_ties_by_time(arena) -> None:
    client, sessions = arena
    early = utcnow() - dt.timedelta(hours=2)
    ids = {}
    for name in ("alpha", "beta", "gamma"):
        ids[name] = _submit(client, _team(client, name), name).json()["id"]
    _score(sessions, ids["alpha"], 0.5, created=early + dt.timedelta(minutes=5))
    _score(sessions, ids["beta"], 0.5, created=early)
    _score(sessions, ids["gamma"], 0.9)
    board = client.get("/api/leaderboard", params={"phase": "validation"}).json()
    assert [(r["rank"], r["team"]) for r in board["rows"]] == [
        (1, "gamma"),
        (2, "beta"),
        (3, "alpha"),
    ]
    assert board["rows"][0]["scores"] == {"sentiment": 0.9}


def test_leaderboard_keeps_the_best_or_the_latest_per_team(arena) -> None:
    client, sessions = arena
    headers = _team(client, "alpha")
    first = _submit(client, headers, "first").json()["id"]
    second = _submit(client, headers, "second").json()["id"]
    _score(sessions, first, 0.8, created=utcnow() - dt.timedelta(minutes=10))
    _score(sessions, second, 0.6)
    best = client.get("/api/leaderboard", params={"mode": "best"}).json()["rows"]
    latest = client.get("/api/leaderboard", params={"mode": "latest"}).json()["rows"]
    assert [r["name"] for r in best] == ["first"]
    assert [r["name"] for r in latest] == ["second"]


def test_calibration_files_are_added_by_the_organizer_and_listed(arena) -> None:
    client, _ = arena
    path = "/api/competitions/demo/calibration"
    files = {"file": ("ice.csv", MC_TASK)}
    refused = client.post(path, data={"name": "ice"}, files=files)
    assert refused.status_code in (401, 403)
    added = client.post(path, data={"name": "ice"}, files=files, headers=ORGANIZER)
    assert added.status_code == 201 and added.json() == {"name": "ice", "examples": 2}
    again = client.post(path, data={"name": "ice"}, files=files, headers=ORGANIZER)
    assert again.status_code == 400 and "already has a calibration file 'ice'" in again.text
    broken = {"file": ("bad.csv", b"id,text\n1,x\n")}
    assert (
        client.post(path, data={"name": "bad"}, files=broken, headers=ORGANIZER).status_code == 400
    )
    listed = client.get("/api/competitions/demo").json()["calibration"]
    assert listed == [{"name": "ice", "examples": 2}]


def test_the_migrations_build_the_schema_the_models_describe(database_url: str) -> None:
    """Every table, column and index of ``db.py`` is made by the Alembic revisions, no more."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from mergearena.arena.db import Base

    engine = make_engine(database_url)
    open_database(database_url)
    with engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    engine.dispose()
    assert [d for d in differences if "alembic_version" not in str(d)] == []


def _baseline(sessions, data_dir: Path) -> int:
    """A submission "base" of the organizers' baseline team to the validation phase."""
    with sessions() as session:
        team, _ = service.register_team(session, "organizers", baseline=True)
        phase = service.get_phase(service.get_competition(session, "demo"), "validation")
        baseline = service.submit(session, data_dir, team, phase, "base", "b.yaml", RECIPE)
        session.commit()
        return baseline.id


def test_baselines_are_marked_and_disqualified_submissions_leave_the_board(
    arena, tmp_path: Path
) -> None:
    client, sessions = arena
    baseline_id = _baseline(sessions, tmp_path)
    mine = _submit(client, _team(client, "alpha")).json()["id"]
    _score(sessions, baseline_id, 0.3)
    _score(sessions, mine, 0.7)
    rows = client.get("/api/leaderboard").json()["rows"]
    assert [(r["name"], r["baseline"]) for r in rows] == [("mine", False), ("base", True)]
    assert client.post(f"/api/submissions/{mine}/disqualify", headers=ORGANIZER).status_code == 200
    assert [r["name"] for r in client.get("/api/leaderboard").json()["rows"]] == ["base"]


def test_the_organizer_submits_baselines_without_a_daily_limit(arena) -> None:
    client, sessions = arena

    def baseline(name: str, headers: dict = ORGANIZER):
        files = {"file": ("base.yaml", RECIPE + f"# {name}".encode())}
        return client.post("/api/baselines", data={"name": name}, files=files, headers=headers)

    assert baseline("sneaky", _team(client, "alpha")).status_code == 401
    ids = [baseline(f"base {n}").json()["id"] for n in range(3)]  # over daily_submissions 2
    for submission_id in ids:
        _score(sessions, submission_id, 0.5)
    rows = client.get("/api/leaderboard").json()["rows"]
    assert [(r["team"], r["baseline"]) for r in rows] == [("mergearena baselines", True)] * 3


def test_the_efficiency_board_ranks_what_beats_the_baseline_by_its_run_cost(
    arena, tmp_path: Path
) -> None:
    client, sessions = arena
    runs = {"base": (_baseline(sessions, tmp_path), 0.5, 5.0)}  # name → (id, average, run seconds)
    for name, average, seconds in [("slow", 0.8, 90.0), ("quick", 0.6, 30.0), ("cheap", 0.4, 1.0)]:
        runs[name] = (_submit(client, _team(client, name), name).json()["id"], average, seconds)
    runs["tied"] = (_submit(client, _team(client, "tied"), "tied").json()["id"], 0.7, 30.0)
    for submission_id, average, seconds in runs.values():
        _score(sessions, submission_id, average)
        with sessions() as session:
            submission = session.get(Submission, submission_id)
            submission.costs = {"seconds": seconds, "peak_rss_bytes": 2**30, "parameters": 1e6}
            session.commit()
    board = client.get("/api/leaderboard").json()
    # below the baseline's 0.5 ("cheap") and the baseline itself are out; equal cost: by score
    assert [(r["rank"], r["name"]) for r in board["efficiency"]] == [
        (1, "tied"),
        (2, "quick"),
        (3, "slow"),
    ]
    assert board["rows"][0]["costs"]["seconds"] == 90.0
    page = client.get("/c/demo").text
    assert 'id="efficiency"' in page and "<td>quick</td>" in page and "1.00" in page
    assert "merged and evaluated within <b>60 min</b>" in page  # the budget the worker enforces


def test_finals_rerun_each_teams_chosen_or_best_submission_unchanged(arena, tmp_path: Path) -> None:
    client, sessions = arena
    alpha, beta = _team(client, "alpha"), _team(client, "beta")
    ids = {}
    for name, headers, average in [("a1", alpha, 0.6), ("a2", alpha, 0.8), ("b1", beta, 0.9)]:
        content = RECIPE + f"# {name}\n".encode()  # each its own files
        ids[name] = _submit(client, headers, name, content).json()["id"]
        _score(sessions, ids[name], average)
    ids["b2"] = _submit(client, beta, "b2", RECIPE + b"# b2\n").json()["id"]  # not scored yet
    baseline_id = _baseline(sessions, tmp_path)
    _score(sessions, baseline_id, 0.3)
    chosen = client.post("/api/teams/me/final", json={"submission_id": ids["b2"]}, headers=beta)
    assert chosen.status_code == 200 and chosen.json()["is_final"], chosen.text
    theirs = client.post("/api/teams/me/final", json={"submission_id": ids["a1"]}, headers=beta)
    assert theirs.status_code == 404 and "team 'beta' has no submission" in theirs.text

    assert client.post("/api/competitions/demo/finals").status_code in (401, 403)
    ran = client.post("/api/competitions/demo/finals", headers=ORGANIZER)
    assert ran.status_code == 200, ran.text
    queued = ran.json()["queued"]
    # alpha's best on the public board, beta's choice, and the baseline
    assert sorted(q["rerun_of"] for q in queued) == sorted([ids["a2"], ids["b2"], baseline_id])
    with sessions() as session:
        for run in queued:
            source = session.get(Submission, run["rerun_of"])
            assert run["phase"] == "final" and run["status"] == "queued"
            assert (run["file_sha256"], run["kind"]) == (source.file_sha256, source.kind)
    again = client.post("/api/competitions/demo/finals", headers=ORGANIZER).json()["queued"]
    assert again == []  # nothing is rerun twice
    rerun = queued[0]["id"]
    refused = client.post("/api/teams/me/final", json={"submission_id": rerun}, headers=alpha)
    assert refused.status_code in (400, 404)


def _run_finals(client: TestClient) -> list[dict]:
    ran = client.post("/api/competitions/demo/finals", headers=ORGANIZER)
    assert ran.status_code == 200, ran.text
    return ran.json()["queued"]


def test_the_final_phase_hides_scores_until_closed(arena) -> None:
    client, sessions = arena
    alpha = _team(client, "alpha")
    _score(sessions, _submit(client, alpha).json()["id"], 0.5)
    (mine,) = [run["id"] for run in _run_finals(client)]
    _score(sessions, mine, 0.7)
    hidden = client.get("/api/leaderboard", params={"phase": "final"}).json()
    assert hidden["rows"][0]["average"] is None and hidden["rows"][0]["rank"] is None
    assert hidden["efficiency"] == []  # its order would give the scores away
    assert "0.7" not in client.get("/c/demo", params={"phase": "final"}).text
    closed = client.post("/api/competitions/demo/phases/final/close", headers=ORGANIZER)
    assert closed.status_code == 200
    shown = client.get("/api/leaderboard", params={"phase": "final"}).json()
    assert shown["rows"][0]["average"] == 0.7 and shown["rows"][0]["rank"] == 1
    files = {"file": ("base.yaml", RECIPE)}
    late = client.post("/api/baselines", data={"phase": "final"}, files=files, headers=ORGANIZER)
    assert late.status_code == 400 and "closed" in late.json()["detail"]


def test_rerun_queues_a_submission_again(arena) -> None:
    client, sessions = arena
    mine = _submit(client, _team(client, "alpha")).json()["id"]
    _score(sessions, mine, 0.7)
    response = client.post(f"/api/submissions/{mine}/rerun", headers=ORGANIZER)
    assert response.json()["status"] == "queued" and response.json()["average"] is None


WRITEUP = b"""# Soup, then *search*

<script>alert(1)</script> <img src=x onerror=alert(2)>
[click](javascript:alert(3)) and [the kit](https://github.com/llm-merging/LLM-Merging)
"""


def _attach(client: TestClient, headers: dict, submission_id: int, name: str, content: bytes):
    return client.post(
        f"/api/submissions/{submission_id}/writeup",
        files={"file": (name, content)},
        headers=headers,
    )


def test_a_writeup_is_rendered_without_scripts_and_is_public_once_it_wins(arena) -> None:
    client, _ = arena
    alpha = _team(client, "alpha")
    mine = _submit(client, alpha).json()["id"]
    attached = _attach(client, alpha, mine, "how.md", WRITEUP)
    assert attached.status_code == 201, attached.text
    assert attached.json()["title"] == "Soup, then search"
    assert attached.json()["format"] == "markdown"
    url = attached.json()["url"]
    # Before it wins, only its team and the organizer see it; to others it does not exist.
    client.cookies.set("mergearena_team", _team(client, "beta")["Authorization"].split()[1])
    assert client.get(url).status_code == 404
    client.cookies.set("mergearena_team", alpha["Authorization"].split()[1])
    shown = client.get(url)
    assert shown.status_code == 200
    assert "<script>" not in shown.text and "<img src=x" not in shown.text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in shown.text
    assert 'href="javascript:' not in shown.text
    assert '<a href="https://github.com/llm-merging/LLM-Merging">the kit</a>' in shown.text
    assert "script-src" not in shown.headers["content-security-policy"]  # default-src 'none'
    assert "default-src 'none'" in shown.headers["content-security-policy"]
    client.cookies.clear()
    marked = client.post(
        "/api/competitions/demo/winners",
        json={"track": "creative", "submission_id": mine},
        headers=ORGANIZER,
    )
    assert marked.status_code == 200, marked.text
    creative = marked.json()["tracks"]["creative"]
    assert [(w["place"], w["submission"]["team"], w["writeup"]["url"]) for w in creative] == [
        (1, "alpha", url)
    ]
    assert "log" not in creative[0]["submission"]  # the public view of a winner
    assert client.get(url).status_code == 200  # now anyone reads it
    winners_page = client.get("/c/demo/winners").text
    assert "Soup, then search" in winners_page and f'href="{url}"' in winners_page


def test_a_pdf_writeup_is_a_sandboxed_download(arena) -> None:
    client, _ = arena
    alpha = _team(client, "alpha")
    mine = _submit(client, alpha).json()["id"]
    pdf = b"%PDF-1.7\n% a write-up\n%%EOF\n"
    assert _attach(client, alpha, mine, "report.PDF", pdf).json()["format"] == "pdf"
    client.cookies.set("mergearena_team", alpha["Authorization"].split()[1])
    served = client.get(f"/writeups/{mine}")
    assert served.content == pdf and served.headers["content-type"] == "application/pdf"
    assert served.headers["content-disposition"].startswith("attachment")
    assert served.headers["content-security-policy"] == "sandbox"


@pytest.mark.parametrize(
    ("name", "content", "refused"),
    [
        ("notes.txt", b"# hi", "Markdown or PDF"),
        ("report.pdf", b"<html>not a pdf", "does not start like a PDF"),
        ("how.md", b"# fine\n\xff\xfe", "byte 0xff on line 2"),
        ("how.md", b"  \n", "is empty"),
        ("how.md", b"#" * 5000, "at most 4000 are accepted"),
    ],
)
def test_a_writeup_that_is_not_one_is_refused(arena, monkeypatch, name, content, refused) -> None:
    from mergearena.arena import writeups

    monkeypatch.setattr(writeups, "MAX_WRITEUP_BYTES", 4000)
    client, _ = arena
    alpha = _team(client, "alpha")
    mine = _submit(client, alpha).json()["id"]
    response = _attach(client, alpha, mine, name, content)
    assert response.status_code == 400 and refused in response.json()["detail"], response.text
    other = _attach(client, _team(client, "beta"), mine, "how.md", WRITEUP)
    assert other.status_code == 404 and "has no submission" in other.json()["detail"]


def test_winners_are_marked_per_track_by_the_organizer_only(arena, tmp_path: Path) -> None:
    client, sessions = arena
    alpha = _team(client, "alpha")
    mine = _submit(client, alpha).json()["id"]
    baseline = _baseline(sessions, tmp_path)

    def mark(body: dict, headers: dict = ORGANIZER):
        return client.post("/api/competitions/demo/winners", json=body, headers=headers)

    assert mark({"track": "performance", "submission_id": mine}, alpha).status_code == 401
    for body, refused in (
        ({"track": "creative", "submission_id": mine}, "has no write-up"),
        ({"track": "speed", "submission_id": mine}, "not one of performance"),
        ({"track": "performance", "submission_id": baseline}, "baseline"),
        ({"track": "performance", "submission_id": mine, "place": 0}, "place must be"),
        ({"track": "performance", "submission_id": 999}, "has no submission 999"),
    ):
        response = mark(body)
        assert response.status_code in (400, 404) and refused in response.json()["detail"], body
    mark({"track": "performance", "submission_id": mine, "place": 2})
    tracks = mark({"track": "efficiency", "submission_id": mine}).json()["tracks"]
    assert [w["place"] for w in tracks["performance"]] == [2] and tracks["creative"] == []
    again = mark({"track": "performance", "submission_id": mine, "place": 1}).json()
    assert [w["place"] for w in again["tracks"]["performance"]] == [1]  # moved, not doubled
    removed = client.delete(f"/api/competitions/demo/winners/performance/{mine}", headers=ORGANIZER)
    assert removed.json()["tracks"]["performance"] == []
    assert client.get("/api/competitions/demo/winners").json() == removed.json()


def test_the_competition_page_draws_progress_and_spread_without_scripts(arena, tmp_path) -> None:
    import re
    import xml.etree.ElementTree as ET

    client, sessions = arena
    start = dt.datetime(2026, 11, 1)
    _score(sessions, _baseline(sessions, tmp_path), 0.5, start)
    for team, averages in (("alpha", (0.4, 0.7, 0.6)), ("<b>beta</b>", (0.55,))):
        headers = _team(client, team)
        for hour, average in enumerate(averages):
            mine = _submit(client, headers, f"{team}{hour}", RECIPE + f"#{hour}".encode())
            _score(sessions, mine.json()["id"], average, start + dt.timedelta(hours=hour + 1))
    page = client.get("/c/demo")
    svgs = {
        figure: ET.fromstring(re.search(rf'<figure id="{figure}">(<svg.*?</svg>)', page.text)[1])
        for figure in ("progress", "distribution")
    }  # well-formed XML: every name in them escaped
    ns = "{http://www.w3.org/2000/svg}"
    legend = [t.text for t in svgs["progress"].iter(f"{ns}text") if t.get("font-size") == "12"]
    assert legend == ["alpha 70.0", "<b>beta</b> 55.0", "organizers 50.0 (baseline)"]
    steps = [p.get("d") for p in svgs["progress"].iter(f"{ns}path")]
    assert steps[0].count("V") == 1  # alpha: 40 then 70; its later 60 is no new best
    bars = [r.find(f"{ns}title").text for r in svgs["distribution"].iter(f"{ns}rect")]
    assert "55–60: 1 team(s)" in bars and "70–75: 1 team(s)" in bars
    assert "50–55: 0 team(s)" in bars  # the baseline is a dashed line, not a team
    assert "<script" not in page.text
    # While a phase hides its scores, so do its charts.
    files = {"file": ("base.yaml", RECIPE)}
    hidden = client.post("/api/baselines", data={"phase": "final"}, files=files, headers=ORGANIZER)
    _score(sessions, hidden.json()["id"], 0.9)
    assert "<svg" not in client.get("/c/demo", params={"phase": "final"}).text


def test_untrusted_names_are_escaped_on_every_page(arena) -> None:
    client, sessions = arena
    evil = "<script>alert(1)</script>"
    headers = _team(client, evil)
    mine = _submit(client, headers, name=f"<img src=x onerror=alert(2)>{evil}").json()["id"]
    _score(sessions, mine, 0.5)
    with sessions() as session:
        session.get(Submission, mine).log = evil
        session.commit()
    client.cookies.set("mergearena_team", headers["Authorization"].split()[1])
    client.cookies.set("mergearena_organizer", "organizer-secret")
    for path in ("/c/demo", "/team", "/admin"):
        page = client.get(path)
        assert page.status_code == 200
        assert "<script>alert" not in page.text and "<img src=x" not in page.text, path
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text, path


def test_the_submission_form_queues_for_the_signed_in_team_and_reports_errors(arena) -> None:
    client, _ = arena
    token = _team(client, "alpha")["Authorization"].split()[1]
    form = {"competition": "demo", "name": "from the form"}
    unsigned = client.post("/submit", data=form, files={"file": ("r.yaml", RECIPE)})
    assert unsigned.status_code == 401 and "no API token given" in unsigned.text
    assert "Sign in first" in client.get("/submit").text
    client.post("/team", data={"token": token})  # signing in sets the cookie the form uses
    assert "Submitting as team “alpha”" in client.get("/submit").text
    ok = client.post("/submit", data=form, files={"file": ("r.yaml", RECIPE)})
    assert ok.status_code == 200 and "from the form" in ok.text and "queued" in ok.text
    client.cookies.clear()
    client.cookies.set("mergearena_team", "nope")
    bad = client.post("/submit", data=form, files={"file": ("r.yaml", RECIPE)})
    assert bad.status_code == 401 and "not valid" in bad.text


def test_code_is_refused_when_there_is_no_sandbox(arena, monkeypatch) -> None:
    from mergearena.arena import sandbox

    client, _ = arena
    monkeypatch.setattr(sandbox, "sandbox_available", lambda: "bwrap is not installed")
    response = _submit(
        client, _team(client, "alpha"), content=b"RECIPE = {}\n", file_name="method.py"
    )
    assert response.status_code == 400
    assert "need a sandbox" in response.json()["detail"]


# ------------------------------------------------------------------------------------------ queue


def _queue_jobs(sessions, data_dir: Path, count: int) -> list[int]:
    with sessions() as session:
        team, _ = service.register_team(session, "loaders", baseline=True)
        phase = service.get_phase(service.get_competition(session, "demo"), "validation")
        ids = [
            service.submit(session, data_dir, team, phase, f"job {k}", "r.yaml", RECIPE).id
            for k in range(count)
        ]
        session.commit()
    return ids


def test_concurrent_workers_never_claim_the_same_job(arena, tmp_path: Path) -> None:
    _, sessions = arena
    ids = _queue_jobs(sessions, tmp_path, 12)
    claimed: list[int] = []
    lock = threading.Lock()

    def worker(name: str) -> None:
        while True:
            with sessions() as session:
                job = queue.claim(session, name, lease_seconds=60)
            if job is None:
                return
            with lock:
                claimed.append(job.id)

    threads = [threading.Thread(target=worker, args=(f"w{k}",)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(claimed) == sorted(ids)


def test_a_lost_worker_s_job_is_retried_once_then_failed(arena, tmp_path: Path) -> None:
    _, sessions = arena
    (job_id,) = _queue_jobs(sessions, tmp_path, 1)
    with sessions() as session:
        assert queue.claim(session, "dies", lease_seconds=-1).id == job_id  # lease already over
        retried = queue.claim(session, "second", lease_seconds=-1)
        assert retried.id == job_id and retried.attempts == 2
        # the first worker comes back too late: its result is not recorded
        assert not queue.finish(session, job_id, "dies", status="scored", log="")
        assert queue.claim(session, "third", lease_seconds=60) is None
        session.expire_all()
        job = session.get(Submission, job_id)
        assert job.status == "failed" and "lost 2 times" in job.error


def test_a_renewed_lease_keeps_the_job(arena, tmp_path: Path) -> None:
    _, sessions = arena
    (job_id,) = _queue_jobs(sessions, tmp_path, 1)
    with sessions() as session:
        queue.claim(session, "alive", lease_seconds=60)
        assert queue.renew(session, job_id, "alive", lease_seconds=60)
        assert not queue.renew(session, job_id, "impostor", lease_seconds=60)
        assert queue.claim(session, "other", lease_seconds=60) is None
        assert queue.finish(session, job_id, "alive", status="scored", log="ok", average=0.5)


def test_an_archive_that_would_escape_is_refused_at_upload(arena, monkeypatch) -> None:
    from mergearena.arena import sandbox

    client, sessions = arena
    monkeypatch.setattr(sandbox, "sandbox_available", lambda: None)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        info = tarfile.TarInfo("../../etc/evil.py")
        info.size = 1
        archive.addfile(info, io.BytesIO(b"x"))
    response = _submit(
        client, _team(client, "alpha"), content=buffer.getvalue(), file_name="kit.tar.gz"
    )
    assert response.status_code == 400
    assert "../../etc/evil.py" in response.json()["detail"]
    with sessions() as session:
        assert session.scalars(select(Submission)).all() == []


def test_a_live_server_answers_only_after_the_change_is_committed(arena, tmp_path: Path) -> None:
    """A client told "queued" reads its submission back at once, however slow the commit is."""
    import time

    import httpx

    client, sessions = arena
    headers = _team(client, "slow team")

    def slow_sessions():
        session = sessions()
        commit = session.commit

        def slow_commit() -> None:
            time.sleep(0.3)
            commit()

        session.commit = slow_commit
        return session

    served = create_app(ArenaSettings(slow_sessions, tmp_path, "organizer-secret"))
    with serve_in_thread(served) as url:
        sent = httpx.post(
            f"{url}/api/submissions",
            data={"name": "mine"},
            files={"file": ("recipe.yaml", RECIPE)},
            headers=headers,
        )
        assert sent.status_code == 201, sent.text
        with sessions() as session:
            assert session.scalars(select(Submission.name)).all() == ["mine"]


def test_submit_and_leaderboard_commands_talk_to_a_live_server(arena, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from mergearena.cli import app

    client, sessions = arena
    token = _team(client, "cli team")["Authorization"].split()[1]
    recipe = tmp_path / "soup.yaml"
    recipe.write_bytes(RECIPE)
    runner = CliRunner()
    served = create_app(ArenaSettings(sessions, tmp_path, "organizer-secret"))
    with serve_in_thread(served) as url:
        common = ["--server", url]
        sent = runner.invoke(
            app, ["submit", str(recipe), *common, "--token", token, "--name", "cli"]
        )
        assert sent.exit_code == 0, sent.output
        assert "demo / validation: queued" in sent.output
        with sessions() as session:
            submission_id = session.scalars(select(Submission.id)).one()
        _score(sessions, submission_id, 0.42)
        board = runner.invoke(app, ["leaderboard", *common, "--json"])
        assert json.loads(board.output)["rows"][0]["name"] == "cli"
        table = runner.invoke(app, ["leaderboard", *common])
        assert "42.0" in table.output and "cli team" in table.output
        refused = runner.invoke(app, ["submit", str(recipe), *common, "--token", "ma_wrong"])
        assert refused.exit_code == 2 and "not valid" in refused.output


def test_the_organizer_pages_create_a_competition_its_phases_and_tasks(arena) -> None:
    client, sessions = arena
    assert "Sign in as organizer" in client.get("/admin").text
    client.post("/admin", data={"token": "wrong"})
    assert "Sign in as organizer" in client.get("/admin").text
    client.post("/admin", data={"token": "organizer-secret"})
    assert "New competition" in client.get("/admin").text
    form = {
        "slug": "second",
        "name": "Second",
        "allowed_models": "zoo:* ./local",
        "rules": "r",
        "max_parameters_billions": "0.5",
        "board_mode": "latest",
        "mc_rule": "cot",
        "fewshot": "1",
        "cot": '{"max_new_tokens": 32}',
    }
    assert client.post("/admin/competitions", data=form).status_code == 200  # after redirect
    for cot, problem in [
        ("{max_new_tokens: 32}", "cot: not JSON"),
        ("[32]", "cot: a JSON object of settings is needed"),
        ('{"stop": [""]}', "cot: stop: a stop string is empty"),
    ]:
        bad = client.post("/admin/competitions", data={**form, "slug": "third", "cot": cot})
        assert bad.status_code == 400 and problem in bad.text, cot
    plain = {**form, "slug": "plain", "mc_rule": "loglik", "fewshot": "", "cot": ""}
    assert client.post("/admin/competitions", data=plain).status_code == 200
    client.post("/admin/phases", data={"competition": "second", "name": "final", "kind": "final"})
    task = {"competition": "second", "phase": "final", "name": "sentiment"}
    client.post("/admin/tasks", data=task, files={"file": ("s.csv", MC_TASK)})
    with sessions() as session:
        competition = service.get_competition(session, "second")
        assert competition.allowed_models == ["zoo:*", "./local"]
        assert competition.max_parameters == 500_000_000 and competition.board_mode == "latest"
        assert (competition.mc_rule, competition.fewshot) == ("cot", 1)
        assert competition.cot == {"max_new_tokens": 32}
        plain = service.get_competition(session, "plain")
        assert (plain.mc_rule, plain.fewshot, plain.cot) == ("loglik", None, None)
        assert [(p.name, p.kind) for p in competition.phases] == [
            ("validation", "validation"),
            ("final", "final"),
        ]
        final = competition.phases[1]
        assert [t.name for t in final.tasks] == ["sentiment"] and not final.closed
        final_id = final.id
    client.post(f"/admin/phases/{final_id}/close")
    with sessions() as session:
        assert service.get_competition(session, "second").phases[1].closed


# ------------------------------------------------------------------ what a rival cannot game


def test_a_team_s_upload_to_the_final_phase_is_refused_saying_how_finals_work(arena) -> None:
    client, sessions = arena
    alpha = _team(client, "alpha")
    refused = _submit(client, alpha, "straight to the finals", phase="final")
    assert refused.status_code == 400
    assert "POST /api/teams/me/final" in refused.json()["detail"]
    assert "organizer queues" in refused.json()["detail"]
    with sessions() as session:
        assert session.scalars(select(Submission)).all() == []
    files = {"file": ("base.yaml", RECIPE)}
    baseline = client.post(
        "/api/baselines", data={"phase": "final"}, files=files, headers=ORGANIZER
    )
    assert baseline.status_code == 201 and baseline.json()["phase"] == "final"


def test_the_final_board_ranks_only_queued_finals_and_baselines(arena, tmp_path: Path) -> None:
    """A team's own final-phase upload (accepted before uploads there were refused) is no
    final: the board after the reveal leaves it out."""
    client, sessions = arena
    alpha, beta = _team(client, "alpha"), _team(client, "beta")
    _score(sessions, _submit(client, alpha).json()["id"], 0.5)
    (rerun,) = _run_finals(client)
    _score(sessions, rerun["id"], 0.6)
    with sessions() as session:  # beta's upload straight into the finals, from an older arena
        beta_team = service.team_for_token(session, beta["Authorization"].split()[1])
        final = service.get_phase(service.get_competition(session, "demo"), "final")
        direct = Submission(
            phase=final,
            team=beta_team,
            name="direct",
            kind="recipe",
            file_name="r.yaml",
            file_sha256=rerun["file_sha256"],
        )
        session.add(direct)
        session.commit()
        direct_id = direct.id
    _score(sessions, direct_id, 0.99)
    client.post("/api/competitions/demo/phases/final/close", headers=ORGANIZER)
    rows = client.get("/api/leaderboard", params={"phase": "final"}).json()["rows"]
    assert [(r["rank"], r["submission_id"]) for r in rows] == [(1, rerun["id"])]


def _final_rows(client: TestClient, **params) -> list[tuple[str, int]]:
    board = client.get("/api/leaderboard", params={"phase": "final", **params}).json()
    return [(r["team"], r["submission_id"]) for r in board["rows"]]


def test_a_hidden_final_board_shows_each_team_s_pick_whatever_the_scores(arena) -> None:
    """The attack: a team with two finals reruns compares the hidden board in mode best with
    mode latest; where they differ, the hidden scores disagree with the order it ran them."""
    client, sessions = arena
    alpha = _team(client, "alpha")
    first, second = (_submit(client, alpha, n, RECIPE + f"# {n}\n".encode()) for n in "ab")
    first, second = first.json()["id"], second.json()["id"]
    _score(sessions, first, 0.6)
    _score(sessions, second, 0.8)
    reruns = {}
    for pick in (first, second):  # a pick, the finals, then another pick and the finals again
        client.post("/api/teams/me/final", json={"submission_id": pick}, headers=alpha)
        (queued,) = _run_finals(client)
        reruns[pick] = queued["id"]
    _score(sessions, reruns[first], 0.9)  # the older rerun scores better, hidden
    _score(sessions, reruns[second], 0.3)
    for pick in (second, first):  # the pick stands, be it the latest rerun or not
        client.post("/api/teams/me/final", json={"submission_id": pick}, headers=alpha)
        for mode in (None, "best", "latest"):
            shown = _final_rows(client, **({"mode": mode} if mode else {}))
            assert shown == [("alpha", reruns[pick])], (pick, mode)
    own = client.get("/api/teams/me", headers=alpha).json()["submissions"]
    assert all(s["average"] is None for s in own if s["phase"] == "final")
    page = client.get("/c/demo", params={"phase": "final"}).text
    assert "90.0" not in page and "30.0" not in page
    client.post("/api/competitions/demo/phases/final/close", headers=ORGANIZER)
    assert _final_rows(client) == [("alpha", reruns[first])]  # the reveal keeps the pick


def test_the_baseline_team_s_name_cannot_be_registered_by_a_participant(arena) -> None:
    client, sessions = arena
    for name in (service.BASELINE_TEAM, "MergeArena Baselines", "ｍergearena  baselines"):
        squat = client.post("/api/teams", json={"name": name})
        assert squat.status_code == 400 and "reserved" in squat.json()["detail"], name
    files = {"file": ("base.yaml", RECIPE)}
    baseline = client.post("/api/baselines", data={"name": "b"}, files=files, headers=ORGANIZER)
    assert baseline.status_code == 201 and baseline.json()["team"] == service.BASELINE_TEAM
    with sessions() as session:
        (team,) = session.scalars(select(Team)).all()
        assert team.is_baseline


def test_a_participant_holding_the_baseline_name_from_before_gets_no_baseline(arena) -> None:
    client, sessions = arena
    with sessions() as session:  # registered before the name was reserved
        session.add(Team(name=service.BASELINE_TEAM, token_sha256="0" * 64, is_baseline=False))
        session.commit()
    files = {"file": ("base.yaml", RECIPE)}
    refused = client.post("/api/baselines", files=files, headers=ORGANIZER)
    assert refused.status_code == 400 and "rename it" in refused.json()["detail"]
    with sessions() as session:
        assert session.scalars(select(Submission)).all() == []


@pytest.mark.parametrize(
    ("first", "second"),
    [("Équipe", "ÉQUIPE"), ("Straße", "STRASSE"), ("equipe", "ｅｑｕｉｐｅ"), ("ﬁsh", "FISH")],
)
def test_team_names_that_fold_alike_are_one_name(arena, first: str, second: str) -> None:
    client, _ = arena
    _team(client, first)
    taken = client.post("/api/teams", json={"name": second})
    assert taken.status_code == 400 and "already exists" in taken.json()["detail"]


def test_registrations_of_one_name_at_once_let_one_through(arena) -> None:
    _, sessions = arena
    names = ["Équipe", "ÉQUIPE", "équipe", "ÉQUIPE "]
    start = threading.Barrier(len(names))
    outcomes: list[str] = []

    def register(name: str) -> None:
        with sessions() as session:
            start.wait()
            try:
                service.register_team(session, name)
                session.commit()
                outcomes.append("registered")
            except service.ArenaError as error:
                assert "already exists" in str(error)
                outcomes.append("refused")

    threads = [threading.Thread(target=register, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["refused"] * 3 + ["registered"]


def _teams_at_0006(database_url: str, names: list[str]) -> None:
    engine = make_engine(database_url)
    migrate(engine, "0006")
    with engine.begin() as connection:
        teams = Table("teams", MetaData(), autoload_with=connection)
        for number, name in enumerate(names):
            connection.execute(
                teams.insert().values(
                    name=name, token_sha256=f"{number:064d}", is_baseline=False, created_at=utcnow()
                )
            )
    engine.dispose()


def test_the_upgrade_folds_existing_team_names(database_url: str) -> None:
    _teams_at_0006(database_url, ["Straße", "Alpha"])
    sessions = open_database(database_url)
    with sessions() as session:
        keys = {name: key for name, key in session.execute(select(Team.name, Team.name_key))}
        assert keys == {"Straße": "strasse", "Alpha": "alpha"}
        with pytest.raises(service.ArenaError, match="already exists"):
            service.register_team(session, "STRASSE")


def test_the_upgrade_refuses_team_names_that_fold_alike_naming_them(database_url: str) -> None:
    _teams_at_0006(database_url, ["Équipe", "ÉQUIPE", "beta"])
    with pytest.raises(service.ArenaError) as refused:
        open_database(database_url)
    assert "'Équipe' (id 1) and 'ÉQUIPE' (id 2)" in str(refused.value)
    assert "Rename all but one" in str(refused.value)
    engine = make_engine(database_url)
    with engine.connect() as connection:  # left as it was
        revision = connection.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar()
        assert revision == "0006"
        assert "name_key" not in Table("teams", MetaData(), autoload_with=connection).c
    engine.dispose()


def test_other_teams_submissions_stay_private_until_their_phase_is_public(arena) -> None:
    client, sessions = arena
    alpha, beta = _team(client, "alpha"), _team(client, "beta")
    mine = _submit(client, alpha).json()["id"]

    def read(who: dict):
        return client.get(f"/api/submissions/{mine}", headers=who)

    for rival in (beta, {}):  # queued: nobody else learns it exists
        assert read(rival).status_code == 404, rival
    _score(sessions, mine, 0.5)
    client.post("/api/teams/me/final", json={"submission_id": mine}, headers=alpha)
    assert read(alpha).json()["is_final"]
    for rival in (beta, {}):  # scored in a public phase: what the board shows, never the pick
        shown = read(rival).json()
        assert shown["average"] == 0.5 and "is_final" not in shown and "log" not in shown
    (rerun,) = _run_finals(client)
    _score(sessions, rerun["id"], 0.7)
    for rival in (beta, {}):  # the finals, scores hidden: not even that it ran
        assert client.get(f"/api/submissions/{rerun['id']}", headers=rival).status_code == 404
    own = client.get(f"/api/submissions/{rerun['id']}", headers=alpha).json()
    assert own["status"] == "scored" and own["average"] is None and own["scores"] is None
    client.post("/api/competitions/demo/phases/final/close", headers=ORGANIZER)
    assert client.get(f"/api/submissions/{rerun['id']}").json()["average"] == 0.7


def _signed_in(client: TestClient, name: str) -> str:
    token = _team(client, name)["Authorization"].split()[1]
    client.cookies.set("mergearena_team", token)
    return token


@pytest.mark.parametrize(
    "elsewhere",
    [
        {"Origin": "https://evil.example"},
        {"Origin": "null"},  # a sandboxed frame
        {"Origin": "http://testserver:8080"},  # another port is another origin
        {"Referer": "https://evil.example/page"},
    ],
)
def test_a_cross_site_post_with_the_cookie_is_refused(arena, elsewhere: dict) -> None:
    client, _ = arena
    token = _signed_in(client, "alpha")
    del client.headers["Origin"]
    for path, form in [
        ("/team/rotate", {}),
        ("/api/teams/me/token", {}),  # the API takes the cookie too
        ("/team/final", {"submission_id": "1"}),
        ("/register", {"name": "login csrf"}),  # signing a browser in to the attacker's team
        ("/team", {"token": token}),
        ("/admin", {"token": "organizer-secret"}),
    ]:
        refused = client.post(path, data=form, headers=elsewhere)
        assert refused.status_code == 403, (path, refused.text)
        assert "may not act for a signed-in browser" in refused.text, path
    assert client.get("/api/teams/me").json()["team"] == "alpha"  # the token did not rotate


def test_a_post_says_where_it_comes_from_unless_it_carries_a_bearer_token(arena) -> None:
    client, _ = arena
    _signed_in(client, "alpha")
    del client.headers["Origin"]
    # No Origin nor Referer, with the cookie: a browser hiding where the request came from.
    hidden = client.post("/team/rotate")
    assert hidden.status_code == 403 and "neither where it comes from" in hidden.text
    assert client.post("/team/rotate", headers={"Referer": "http://testserver/team"}).is_success
    # A script without cookies may register, and an API client's bearer token is no ambient
    # credential: neither needs to say where it comes from.
    client.cookies.clear()
    scripted = {
        "Authorization": f"Bearer {client.post('/api/teams', json={'name': 's'}).json()['token']}"
    }
    foreign = client.post(
        "/api/teams/me/token", headers={**scripted, "Origin": "https://x.example"}
    )
    assert foreign.status_code == 200


def test_the_sign_in_cookie_is_secure_over_https(tmp_path: Path, database_url: str) -> None:
    sessions = open_database(database_url)
    app = create_app(ArenaSettings(sessions, tmp_path, "organizer-secret"))
    for base, secure in (("https://arena.example", True), ("http://arena.example", False)):
        client = TestClient(app, base_url=base, headers={"Origin": base})
        registered = client.post("/register", data={"name": f"team {secure}"})
        cookie = registered.headers["set-cookie"]
        assert ("; secure" in cookie.lower()) is secure, cookie
        assert "httponly" in cookie.lower() and "samesite=strict" in cookie.lower()


def _limited_client(tmp_path: Path, database_url: str, **limits: str) -> TestClient:
    sessions = open_database(database_url)
    settings = ArenaSettings(sessions, tmp_path, "organizer-secret", **limits)
    return TestClient(create_app(settings), headers=SAME_ORIGIN)


def test_registrations_are_limited_per_address(tmp_path: Path, database_url: str) -> None:
    client = _limited_client(tmp_path, database_url, registration_limit="2/hour")
    for name in ("a", "b"):
        _team(client, name)
    for path, body in [
        ("/api/teams", {"json": {"name": "c"}}),
        ("/register", {"data": {"name": "c"}}),
    ]:
        refused = client.post(path, **body)
        assert refused.status_code == 429, path
        assert 0 < int(refused.headers["Retry-After"]) <= 3600
        assert "too many registrations from your address" in refused.text


def test_wrong_tokens_are_limited_per_address(tmp_path: Path, database_url: str) -> None:
    client = _limited_client(tmp_path, database_url, failed_token_limit="3/minute")
    right = _team(client, "alpha")
    assert client.get("/api/teams/me", headers=right).status_code == 200  # no failure
    wrong = [{"Authorization": f"Bearer ma_guess{n}"} for n in range(2)]
    assert [client.get("/api/teams/me", headers=w).status_code for w in wrong] == [401, 401]
    assert client.post("/admin", data={"token": "guess"}).status_code == 401
    for headers in (right, ORGANIZER, wrong[0]):  # past the limit, no token is checked
        refused = client.get("/api/teams/me", headers=headers)
        assert refused.status_code == 429 and "too many wrong tokens" in refused.text
        assert 0 < int(refused.headers["Retry-After"]) <= 60


def test_the_organizer_token_can_come_from_a_file(tmp_path: Path, monkeypatch) -> None:
    import uvicorn
    from typer.testing import CliRunner

    from mergearena.cli import app

    served = []
    monkeypatch.setattr(uvicorn, "run", lambda arena_app, **_: served.append(arena_app))
    monkeypatch.delenv("MERGEARENA_ORGANIZER_TOKEN", raising=False)
    token_file = tmp_path / "organizer-token"
    token_file.write_text("from-the-file\n")
    common = ["serve", "--db", f"sqlite:///{tmp_path / 'a.db'}", "--data-dir", str(tmp_path)]
    runner = CliRunner()
    started = runner.invoke(app, [*common, "--organizer-token-file", str(token_file)])
    assert started.exit_code == 0, started.output
    assert served[0].state.settings.organizer_token == "from-the-file"
    assert "from-the-file" not in started.output
    twice = runner.invoke(
        app,
        [*common, "--organizer-token-file", str(token_file)],
        env={"MERGEARENA_ORGANIZER_TOKEN": "from-the-environment"},
    )
    assert twice.exit_code == 2 and "not both" in twice.output
    by_env = runner.invoke(app, common, env={"MERGEARENA_ORGANIZER_TOKEN": "from-the-env"})
    assert by_env.exit_code == 0 and served[-1].state.settings.organizer_token == "from-the-env"
    help_text = runner.invoke(app, ["serve", "--help"], env={"COLUMNS": "200"}).output
    assert "visible to other users" in help_text
