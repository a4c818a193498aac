"""What the arena does, independent of HTTP: competitions, tasks, teams, submissions, leaderboards.

The web app (``arena/web/``) and the worker (``arena/worker.py``) call these functions with a
SQLAlchemy session. Every refusal is an ``ArenaError`` whose message says what to do.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
import json
import secrets
import tempfile
from collections.abc import Collection
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import SQLColumnExpression, case, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased

from mergearena.arena.db import (
    BOARD_MODES,
    NAME_KEY_LENGTH,
    PHASE_KINDS,
    TRACKS,
    Award,
    CalibrationFile,
    Competition,
    Phase,
    PhaseTask,
    Submission,
    Team,
    Writeup,
    fold_name,
    lock_for_update,
    utcnow,
)
from mergearena.checkpoints.writer import write_atomic
from mergearena.errors import (
    ArenaError,
    AuthError,
    LimitError,
    MergeArenaError,
    NotFoundError,
    SubmissionError,
)

if TYPE_CHECKING:
    from mergearena.evaluation import Task

MAX_UPLOAD_BYTES = 32 * 2**20
RECIPE_SUFFIXES = (".yaml", ".yml")
CODE_SUFFIXES = (".py", ".tar", ".tar.gz", ".tgz", ".zip")
TOKEN_PREFIX = "ma_"


# ------------------------------------------------------------------------------------- storage


def blob_path(data_dir: Path, sha256: str) -> Path:
    return data_dir / "blobs" / sha256[:2] / sha256


def store_blob(data_dir: Path, data: bytes) -> str:
    """Store ``data`` under its SHA-256 (written to a temporary file, then renamed into place)."""
    sha256 = hashlib.sha256(data).hexdigest()
    path = blob_path(data_dir, sha256)
    if not path.exists():
        write_atomic(path, data)
    return sha256


# ----------------------------------------------------------------------------------- validation


def _check_name(label: str, name: str, limit: int) -> str:
    name = " ".join(name.split())
    if not name:
        raise ArenaError(f"the {label} is empty; give it a name")
    if len(name) > limit:
        raise ArenaError(f"the {label} is {len(name)} characters long; at most {limit} are allowed")
    if any(not c.isprintable() for c in name):
        raise ArenaError(f"the {label} {name!r} holds control characters; use printable text")
    return name


def _check_slug(slug: str) -> str:
    if not slug or len(slug) > 64 or not all(c.isalnum() or c in "-_" for c in slug):
        raise ArenaError(
            f"{slug!r} is not a valid identifier: use 1-64 letters, digits, '-' or '_'"
        )
    return slug


# --------------------------------------------------------------------------------- competitions


class CompetitionSpec(BaseModel):
    """What an organizer sets for a competition (the JSON API takes the same fields)."""

    model_config = ConfigDict(extra="forbid")  # a misspelt setting fails instead of vanishing

    slug: str
    name: str
    rules: str = ""
    allowed_models: list[str] = Field(default_factory=list)  # references or patterns ("zoo:*")
    max_parameters: int | None = 8_000_000_000
    time_limit_seconds: int = 3600
    memory_limit_bytes: int | None = 16 * 2**30
    daily_submissions: int = 1
    mc_rule: str = "loglik"
    fewshot: int | None = None  # solved examples per question; None: each task's own
    cot: dict[str, Any] | None = None  # CotSettings keys over each task's, under mc_rule cot
    board_mode: str = "best"
    allow_unsandboxed: bool = False


def _check_strategy(spec: CompetitionSpec) -> dict[str, Any] | None:
    """Refuse an inference strategy that cannot work; returns the CoT settings normalized."""
    from mergearena.evaluation.tasks import MC_RULES, check_cot_overrides

    if spec.mc_rule not in MC_RULES:
        raise ArenaError(f"mc_rule {spec.mc_rule!r} is not one of {', '.join(MC_RULES)}")
    if spec.fewshot is not None and spec.fewshot < 0:
        raise ArenaError(
            f"fewshot must be 0 or more (or empty: each task's own), got {spec.fewshot}"
        )
    if spec.cot is None:
        return None
    if spec.mc_rule != "cot":
        raise ArenaError(
            f"cot settings apply only under mc_rule cot, and this competition's is "
            f"{spec.mc_rule!r}: set mc_rule to cot, or leave cot out"
        )
    try:
        return check_cot_overrides(spec.cot)
    except ValueError as error:
        raise ArenaError(f"cot: {error}") from None


def create_competition(session: Session, spec: CompetitionSpec) -> Competition:
    _check_slug(spec.slug)
    if session.scalar(select(Competition).where(Competition.slug == spec.slug)):
        raise ArenaError(f"a competition {spec.slug!r} already exists; choose another slug")
    if spec.board_mode not in BOARD_MODES:
        raise ArenaError(f"board mode {spec.board_mode!r} is not one of {', '.join(BOARD_MODES)}")
    cot = _check_strategy(spec)
    if spec.daily_submissions < 1 or spec.time_limit_seconds < 1:
        raise ArenaError("daily_submissions and time_limit_seconds must be at least 1")
    competition = Competition(
        slug=spec.slug,
        name=_check_name("competition name", spec.name, 200),
        rules=spec.rules,
        allowed_models=list(spec.allowed_models),
        max_parameters=spec.max_parameters,
        time_limit_seconds=spec.time_limit_seconds,
        memory_limit_bytes=spec.memory_limit_bytes,
        daily_submissions=spec.daily_submissions,
        mc_rule=spec.mc_rule,
        fewshot=spec.fewshot,
        cot=cot,
        board_mode=spec.board_mode,
        allow_unsandboxed=spec.allow_unsandboxed,
    )
    session.add(competition)
    session.flush()
    return competition


def competitions(session: Session) -> list[Competition]:
    return list(session.scalars(select(Competition).order_by(Competition.id)))


def get_competition(session: Session, slug: str) -> Competition:
    competition = session.scalar(select(Competition).where(Competition.slug == slug))
    if competition is None:
        known = session.scalars(select(Competition.slug)).all()
        raise NotFoundError(f"no competition {slug!r}; known: {', '.join(known) or 'none'}")
    return competition


def add_phase(session: Session, competition: Competition, name: str, kind: str) -> Phase:
    _check_slug(name)
    if kind not in PHASE_KINDS:
        raise ArenaError(f"phase kind {kind!r} is not one of {', '.join(PHASE_KINDS)}")
    if any(p.name == name for p in competition.phases):
        raise ArenaError(f"{competition.slug} already has a phase {name!r}")
    phase = Phase(competition=competition, name=name, kind=kind)
    session.add(phase)
    session.flush()
    return phase


def get_phase(competition: Competition, name: str | None = None) -> Phase:
    """The named phase, or the first open one (the last one when all are closed)."""
    if not competition.phases:
        raise ArenaError(f"{competition.slug} has no phases yet")
    if name is None:
        open_phases = [p for p in competition.phases if not p.closed]
        return open_phases[0] if open_phases else competition.phases[-1]
    for phase in competition.phases:
        if phase.name == name:
            return phase
    names = ", ".join(p.name for p in competition.phases)
    raise NotFoundError(f"{competition.slug} has no phase {name!r}; its phases: {names}")


def _load_upload(name: str, content: bytes, sidecar: dict[str, Any] | None = None) -> Task:
    """An uploaded task file (and its settings) read by the harness, which says what is wrong."""
    from mergearena.evaluation.tasks import load_settings, load_task

    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / f"{name}.csv"
        path.write_bytes(content)
        if sidecar is not None:
            sidecar_path = Path(scratch) / f"{name}.json"
            sidecar_path.write_text(json.dumps(sidecar))
            load_settings(sidecar_path)
        return load_task(path)


def add_task(
    session: Session,
    data_dir: Path,
    phase: Phase,
    name: str,
    content: bytes,
    sidecar: dict[str, Any] | None = None,
) -> PhaseTask:
    """Validate a task file in the harness's format and store it with and without targets;
    refuse it if it cannot be asked as the competition sets (few-shot examples it lacks)."""
    from mergearena.errors import EvaluationError
    from mergearena.evaluation.runner import choose_strategy

    _check_slug(name)
    if any(t.name == name for t in phase.tasks):
        raise ArenaError(f"phase {phase.name} already has a task {name!r}")
    task = _load_upload(name, content, sidecar)
    if not task.has_targets:
        raise ArenaError(f"task {name}: every row needs a target; the service keeps them hidden")
    competition = phase.competition
    try:
        choose_strategy(
            task, mc_rule=competition.mc_rule, fewshot=competition.fewshot, cot=competition.cot
        )
    except EvaluationError as error:
        raise ArenaError(
            f"task {name} cannot be asked as this competition sets (mc_rule "
            f"{competition.mc_rule}, fewshot {competition.fewshot}): {error}"
        ) from None
    rows = list(csv.DictReader(io.StringIO(content.decode("utf-8-sig"))))
    inputs = io.StringIO()
    columns = [c for c in rows[0] if c.strip() != "target"]
    writer = csv.DictWriter(inputs, columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    record = PhaseTask(
        phase=phase,
        name=name,
        inputs_sha256=store_blob(data_dir, inputs.getvalue().encode()),
        full_sha256=store_blob(data_dir, content),
        sidecar=json.dumps(sidecar) if sidecar is not None else None,
        examples=len(task.examples),
        main_metric=task.main_metric,
        targets_public=phase.kind == "validation",
    )
    session.add(record)
    session.flush()
    return record


def add_calibration(
    session: Session, data_dir: Path, competition: Competition, name: str, content: bytes
) -> CalibrationFile:
    """Give every job of ``competition`` a calibration file (the harness's task format, targets
    allowed): read-only at ``$MERGEARENA_CALIBRATION/<name>.csv`` in the sandbox, never scored."""
    _check_slug(name)
    if any(f.name == name for f in competition.calibration):
        raise ArenaError(f"competition {competition.slug} already has a calibration file {name!r}")
    task = _load_upload(name, content)
    record = CalibrationFile(
        name=name, sha256=store_blob(data_dir, content), examples=len(task.examples)
    )
    competition.calibration.append(record)
    session.flush()
    return record


def close_phase(session: Session, phase: Phase) -> None:
    """Stop taking submissions; for the final phase this also reveals the scores."""
    phase.closed = True
    session.flush()


# ---------------------------------------------------------------------------------------- teams


def _hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


BASELINE_TEAM = "mergearena baselines"


def register_team(session: Session, name: str, *, baseline: bool = False) -> tuple[Team, str]:
    """Create a team; returns it with its API token, which is stored only as a hash.

    Names are unique as ``db.fold_name`` compares them (Unicode case folding). The database's
    unique index decides, so of two registrations of one name at once only one succeeds; the
    other's transaction is lost with its error. The baseline team's name is the organizer's.
    """
    name = _check_name("team name", name, 100)
    key = fold_name(name)
    if len(key) > NAME_KEY_LENGTH:
        raise ArenaError(
            f"the team name {name!r} grows to {len(key)} characters under Unicode normalization; "
            f"at most {NAME_KEY_LENGTH} are allowed: choose a shorter name"
        )
    if key == fold_name(BASELINE_TEAM) and not baseline:
        raise ArenaError(
            f"the team name {name!r} is reserved for the organizer's baselines; choose another name"
        )
    token = new_token()
    team = Team(name=name, token_sha256=_hash_token(token), is_baseline=baseline)
    session.add(team)
    try:
        session.flush()
    except IntegrityError as error:
        if "name" not in str(error.orig):  # not the name's constraint: not ours to explain
            raise
        raise ArenaError(
            f"a team named {name!r}, or a name that differs only in letter case or Unicode "
            "form, already exists; choose another name"
        ) from None
    return team, token


def baseline_team(session: Session) -> Team:
    """The organizer's baseline "team" (created on first use; its token is never shown: its
    submissions come from the organizer). Each baseline is ranked as its own entrant.

    Found by its ``is_baseline`` flag, which no registration sets, never by name alone: a
    participant who registered the name first would otherwise get the organizer's baselines."""
    key = fold_name(BASELINE_TEAM)
    team = session.scalar(select(Team).where(Team.is_baseline, Team.name_key == key))
    if team is not None:
        return team
    squatter = session.scalar(select(Team).where(Team.name_key == key))
    if squatter is not None:  # registered before the name was reserved
        raise ArenaError(
            f"team {squatter.name!r} (id {squatter.id}) is a participant's team that holds the "
            f"baseline team's name, registered before that name was reserved; rename it "
            f"(UPDATE teams SET name = 'new name', name_key = 'new name' WHERE id = "
            f"{squatter.id}) and submit the baseline again"
        )
    team, _token = register_team(session, BASELINE_TEAM, baseline=True)
    return team


def rotate_token(session: Session, team: Team) -> str:
    token = new_token()
    team.token_sha256 = _hash_token(token)
    session.flush()
    return token


def team_for_token(session: Session, token: str | None) -> Team:
    if not token:
        raise AuthError("no API token given; pass the token your team got at registration")
    team = session.scalar(select(Team).where(Team.token_sha256 == _hash_token(token.strip())))
    if team is None:
        raise AuthError("the API token is not valid; check it, or rotate it from your team page")
    return team


# ---------------------------------------------------------------------------------- submissions


def submission_kind(file_name: str) -> str:
    lower = file_name.lower()
    if lower.endswith(RECIPE_SUFFIXES):
        return "recipe"
    if lower.endswith(CODE_SUFFIXES):
        return "code"
    raise SubmissionError(
        f"{file_name!r}: a submission is a recipe ({', '.join(RECIPE_SUFFIXES)}), code "
        f"({', '.join(CODE_SUFFIXES)}), or a routed model (the directory `mergearena route` "
        "writes, as an archive)"
    )


def check_recipe(competition: Competition, content: bytes) -> None:
    """Parse a recipe and check every model it names against the competition's allowlist.

    By name only, as a courtesy at upload (the server may not hold the models): the job's merge
    is what enforces the allowlist, on every model it opens (an adapter's own base included).
    """
    from mergearena.arena.policy import is_listed
    from mergearena.checkpoints.refs import split_adapter_ref
    from mergearena.recipe import parse_recipe

    try:
        text = content.decode("utf-8")
        recipe = parse_recipe(text)
    except UnicodeDecodeError:
        raise SubmissionError("the recipe is not UTF-8 text") from None
    except MergeArenaError as error:
        raise SubmissionError(f"the recipe is invalid: {error}") from None
    written = [e.model for e in recipe.models]
    written += [s.model for sl in recipe.slices or [] for s in sl.sources]
    written += [r for r in (recipe.base_model, recipe.tokenizer_source) if r and r != "base"]
    names = [name for ref in written for name in split_adapter_ref(ref) if name is not None]
    refused = sorted({n for n in names if not is_listed(n, competition.allowed_models)})
    if refused:
        raise SubmissionError(
            f"the recipe names model(s) this competition does not allow: {', '.join(refused)}; "
            f"allowed: {', '.join(competition.allowed_models)}"
        )


def check_code(competition: Competition, file_name: str, content: bytes) -> str:
    """The kind of an upload that is not a recipe: ``routed`` for an archive holding a routed
    model (``mergearena route``'s directory: no code runs), else ``code``, refused where nobody
    can run it safely. Archives that would not extract safely are refused either way."""
    from mergearena.arena.policy import is_listed
    from mergearena.arena.runner import open_routed
    from mergearena.arena.safetar import extract_archive
    from mergearena.arena.sandbox import sandbox_available
    from mergearena.checkpoints.routed import find_routed_dir

    if not file_name.lower().endswith(".py"):
        with tempfile.TemporaryDirectory() as scratch:
            archive = Path(scratch) / Path(file_name).name
            archive.write_bytes(content)
            extracted = Path(scratch) / "extracted"
            extract_archive(archive, extracted)
            if find_routed_dir(extracted) is not None:
                _, manifest = open_routed(extracted)
                if not is_listed(manifest.base, competition.allowed_models):
                    raise SubmissionError(
                        f"the routed model's base {manifest.base!r} is not allowed in this "
                        f"competition; allowed: {', '.join(competition.allowed_models)}"
                    )
                return "routed"
    reason = sandbox_available()
    if reason is not None and not competition.allow_unsandboxed:
        raise SubmissionError(
            f"code submissions need a sandbox and this server has none ({reason}); "
            "submit a recipe instead, or ask the organizer"
        )
    if file_name.lower().endswith(".py"):
        try:
            compile(content, file_name, "exec")
        except (SyntaxError, ValueError) as error:
            raise SubmissionError(f"{file_name}: not valid Python: {error}") from None
    return "code"


def next_slot(now: dt.datetime) -> dt.datetime:
    """Submission limits count per UTC calendar day: the next slot opens at UTC midnight."""
    return dt.datetime.combine(now.date() + dt.timedelta(days=1), dt.time())


def check_daily_limit(session: Session, team: Team, competition: Competition) -> None:
    now = utcnow()
    midnight = dt.datetime.combine(now.date(), dt.time())
    used = session.scalar(
        select(func.count(Submission.id))
        .join(Phase, Submission.phase_id == Phase.id)
        .where(
            Phase.competition_id == competition.id,
            Submission.team_id == team.id,
            Submission.created_at >= midnight,
        )
    )
    if used is not None and used >= competition.daily_submissions:
        opens = next_slot(now)
        wait = opens - now
        hours, rest = divmod(int(wait.total_seconds()), 3600)
        raise LimitError(
            f"team {team.name!r} has used its {competition.daily_submissions} submission(s) for "
            f"{now:%Y-%m-%d} (UTC days); the next slot opens at {opens:%Y-%m-%d %H:%M} UTC, "
            f"in {hours} h {rest // 60} min"
        )


def submit(
    session: Session,
    data_dir: Path,
    team: Team,
    phase: Phase,
    name: str,
    file_name: str,
    content: bytes,
) -> Submission:
    """Validate and queue a submission: phase open, limits, allowlist, a safe archive.

    Commits: what ``session`` held before, then the submission with its daily-limit check, in
    one transaction under the team's lock (``db.lock_for_update``)."""
    competition = phase.competition
    check_entry(team, phase)
    name = _check_name("submission name", name, 200)
    file_name = Path(file_name.replace("\\", "/")).name or "submission"
    if phase.closed:
        raise SubmissionError(f"phase {phase.name} of {competition.slug} is closed")
    if len(content) > MAX_UPLOAD_BYTES:
        raise SubmissionError(
            f"the upload is {len(content)} bytes; at most {MAX_UPLOAD_BYTES} are accepted. "
            "Submit a recipe or code, not model weights: models are named by reference"
        )
    limited = not team.is_baseline
    if limited:  # refuse early, before the work below; the check that binds is the locked one
        check_daily_limit(session, team, competition)
    kind = submission_kind(file_name)
    if kind == "recipe":
        check_recipe(competition, content)
    else:
        kind = check_code(competition, file_name, content)
    file_sha256 = store_blob(data_dir, content)
    # Count and insert in one transaction holding the team's lock: uploads released at the same
    # moment queue here, and the second one counts the first.
    lock_for_update(session, team)
    try:
        if limited:
            check_daily_limit(session, team, competition)
        submission = Submission(
            phase=phase,
            team=team,
            name=name,
            kind=kind,
            file_name=file_name,
            file_sha256=file_sha256,
        )
        session.add(submission)
        session.commit()
    except BaseException:
        session.rollback()  # let the next upload of this team go at once
        raise
    return submission


def check_entry(team: Team, phase: Phase) -> None:
    """Refuse a team's own upload to a final phase: the finals run each team's pick, frozen,
    queued by the organizer (``run_finals``), on tasks no team has been scored on. Only the
    organizer's baselines may be uploaded there directly."""
    if phase.kind == "final" and not team.is_baseline:
        raise SubmissionError(
            f"phase {phase.name} of {phase.competition.slug} is the finals, which take no "
            "uploads: choose your final among your submissions to the public phases (POST "
            '/api/teams/me/final with {"submission_id": N}, or "Make it our final" on your '
            "team page; without a choice your best on the latest public phase runs), and the "
            "organizer queues every team's final there with its files unchanged"
        )


def rerun(session: Session, submission: Submission) -> None:
    """Queue a submission again from scratch (organizer action)."""
    submission.status = "queued"
    submission.attempts = 0
    submission.lease_owner = submission.lease_expires_at = None
    submission.average = submission.scores = submission.error = None
    submission.log = ""
    session.flush()


def _own_submission(session: Session, team: Team, submission_id: int) -> Submission:
    submission = session.get(Submission, submission_id)
    if submission is None or submission.team_id != team.id:
        raise NotFoundError(f"team {team.name!r} has no submission {submission_id}")
    return submission


def choose_final(session: Session, team: Team, submission_id: int) -> Submission:
    """A team's choice of the submission whose files, unchanged, the finals run (one per
    competition; without a choice, its best on the latest public phase it entered runs)."""
    submission = _own_submission(session, team, submission_id)
    if submission.phase.kind == "final":
        raise ArenaError(
            f"submission {submission_id} is a finals run; choose one of the public phases'"
        )
    competition_id = submission.phase.competition_id
    for other in session.scalars(
        select(Submission)
        .join(Phase, Submission.phase_id == Phase.id)
        .where(Submission.team_id == team.id, Phase.competition_id == competition_id)
    ):
        other.is_final = other.id == submission.id
    session.flush()
    return submission


def run_finals(session: Session, competition: Competition) -> list[Submission]:
    """Queue, in the final phase, each team's final submission with its files unchanged (its
    choice, else its best on the latest public phase it entered) and every baseline (organizer
    action). A submission already rerun there is not queued twice. Scores stay hidden until the
    organizer closes the phase; a failed rerun shows as failed, its log to its team only."""
    final = next((p for p in competition.phases if p.kind == "final"), None)
    if final is None or final.closed:
        state = "no final phase" if final is None else f"its final phase {final.name} is closed"
        raise ArenaError(f"competition {competition.slug} has {state}; add an open one first")
    # One source per team (every baseline is its own entrant, as on a board): its best on the
    # latest public phase where it has a scored submission.
    sources: dict[tuple[str, int], int] = {}
    for phase in reversed([p for p in competition.phases if p.kind != "final"]):
        for row in leaderboard(session, phase, "best"):
            sources.setdefault(
                (row.team, row.submission_id if row.baseline else 0), row.submission_id
            )
    chosen = session.scalars(
        select(Submission)
        .join(Phase, Submission.phase_id == Phase.id)
        .where(Phase.competition_id == competition.id, Submission.is_final)
    )
    sources.update({(submission.team.name, 0): submission.id for submission in chosen})
    done = set(session.scalars(select(Submission.rerun_of).where(Submission.phase_id == final.id)))
    queued = []
    for source_id in sorted(set(sources.values()) - done):
        source = session.get(Submission, source_id)
        assert source is not None
        rerun = Submission(
            phase=final,
            team=source.team,
            name=source.name,
            kind=source.kind,
            file_name=source.file_name,
            file_sha256=source.file_sha256,
            rerun_of=source.id,
        )
        session.add(rerun)
        queued.append(rerun)
    session.flush()
    return queued


def disqualify(session: Session, submission: Submission, disqualified: bool = True) -> None:
    submission.disqualified = disqualified
    session.flush()


SUBMISSION_ACTIONS = ("rerun", "disqualify", "requalify")


def organize(session: Session, submission: Submission, action: str) -> None:
    """An organizer's action on a submission, by name (one of ``SUBMISSION_ACTIONS``)."""
    if action == "rerun":
        rerun(session, submission)
    elif action in ("disqualify", "requalify"):
        disqualify(session, submission, action == "disqualify")
    else:
        actions = ", ".join(SUBMISSION_ACTIONS)
        raise NotFoundError(f"no action {action!r}; use one of {actions}")


# ------------------------------------------------------------------------ write-ups and winners


def attach_writeup(
    session: Session,
    data_dir: Path,
    team: Team,
    submission_id: int,
    file_name: str,
    content: bytes,
) -> Writeup:
    """Attach (or replace) the write-up of one of the team's submissions: Markdown or PDF,
    checked by ``arena/writeups.py``. It is public once the submission wins a track."""
    from mergearena.arena.writeups import check_writeup

    submission = _own_submission(session, team, submission_id)
    checked = check_writeup(file_name, content)
    writeup = submission.writeup
    if writeup is None:
        writeup = Writeup()
        submission.writeup = writeup
    writeup.format, writeup.title = checked.format, checked.title
    writeup.file_name = _check_name("file name", file_name, 255)
    writeup.sha256, writeup.size_bytes = store_blob(data_dir, content), len(content)
    writeup.created_at = utcnow()
    session.flush()
    return writeup


def is_awarded(session: Session, submission_id: int) -> bool:
    return session.scalar(select(Award.id).where(Award.submission_id == submission_id)) is not None


def _award(
    session: Session, competition: Competition, track: str, submission_id: int
) -> Award | None:
    return session.scalar(
        select(Award).where(
            Award.competition_id == competition.id,
            Award.track == track,
            Award.submission_id == submission_id,
        )
    )


def mark_winner(
    session: Session, competition: Competition, track: str, submission_id: int, place: int = 1
) -> Award:
    """Mark a submission as a winner of one of the competition's tracks (organizer action); its
    write-up becomes public. Marking it again sets its place."""
    if track not in TRACKS:
        raise ArenaError(f"track {track!r} is not one of {', '.join(TRACKS)}")
    if place < 1:
        raise ArenaError(f"place must be 1 or more, got {place}")
    submission = session.get(Submission, submission_id)
    if submission is None or submission.phase.competition_id != competition.id:
        raise NotFoundError(f"competition {competition.slug} has no submission {submission_id}")
    if submission.team.is_baseline:
        raise ArenaError(f"submission {submission_id} is the organizer's baseline, not an entry")
    if track == "creative" and submission.writeup is None:
        raise ArenaError(
            f"submission {submission_id} has no write-up; the creative track judges write-ups: "
            "its team attaches one first"
        )
    award = _award(session, competition, track, submission_id)
    if award is None:
        award = Award(competition_id=competition.id, track=track, submission=submission)
        session.add(award)
    award.place = place
    session.flush()
    return award


def unmark_winner(
    session: Session, competition: Competition, track: str, submission_id: int
) -> None:
    award = _award(session, competition, track, submission_id)
    if award is None:
        raise NotFoundError(f"submission {submission_id} is not a winner of the {track} track")
    session.delete(award)
    session.flush()


def winners(session: Session, competition: Competition) -> dict[str, list[Award]]:
    """Every track's winners by place (then by when they were marked); a track without winners
    has an empty list."""
    awards = session.scalars(
        select(Award)
        .where(Award.competition_id == competition.id)
        .order_by(Award.place, Award.created_at, Award.id)
    )
    by_track: dict[str, list[Award]] = {track: [] for track in TRACKS}
    for award in awards:
        by_track[award.track].append(award)
    return by_track


def is_public(submission: Submission) -> bool:
    """Whether anyone may read a submission (its public side: name, team, phase, status,
    scores): once it is scored in a phase whose scores are shown, as a board could show it.
    Until then it is its team's and the organizer's, so that no rival learns what a team
    entered, when, or how its runs went while the phase hides them."""
    return submission.status == "scored" and submission.phase.scores_visible


def team_submissions(session: Session, team: Team) -> list[Submission]:
    return list(
        session.scalars(
            select(Submission)
            .where(Submission.team_id == team.id)
            .order_by(Submission.created_at.desc(), Submission.id.desc())
        )
    )


# ---------------------------------------------------------------------------------- leaderboard


@dataclass
class BoardRow:
    rank: int | None  # None while the phase hides scores
    submission_id: int
    name: str
    team: str
    baseline: bool
    average: float | None  # None while the phase hides scores
    scores: dict[str, float | None]
    submitted_at: dt.datetime
    costs: dict[str, Any]  # what the run cost (the worker's ``_costs``); {} if not recorded


def leaderboard(session: Session, phase: Phase, mode: str | None = None) -> list[BoardRow]:
    """One row per team (its best or latest scored submission) and every baseline, ranked by
    the average of the tasks' main metrics; ties go to the earlier submission.

    A final phase ranks only the finals the organizer queued (``run_finals``) and baselines,
    and whatever the mode, a team's row there is the rerun of its final pick, else its latest:
    chosen without reading a score, so the board says nothing while the scores are hidden (not
    which of two reruns did better), and the reveal cannot keep the better of two."""
    mode = mode or phase.competition.board_mode
    if mode not in BOARD_MODES:
        raise ArenaError(f"board mode {mode!r} is not one of {', '.join(BOARD_MODES)}")
    # Pick each team's row in the database (a window function, SQLite and PostgreSQL alike), so
    # a board over many thousands of submissions loads one row per team. A baseline is its own
    # "team": every baseline submission keeps its row.
    final = phase.kind == "final"
    source = aliased(Submission)  # a finals rerun's source, where the team's pick is marked
    order: tuple[SQLColumnExpression[Any], ...]
    if final:
        order = (
            case((source.is_final, 0), else_=1),
            Submission.created_at.desc(),
            Submission.id.desc(),
        )
    elif mode == "best":
        order = (Submission.average.desc().nulls_last(), Submission.created_at, Submission.id)
    else:
        order = (Submission.created_at.desc(), Submission.id.desc())
    entries = [
        Submission.phase_id == phase.id,
        Submission.status == "scored",
        Submission.disqualified.is_(False),
    ]
    if final:  # a team's own upload there (refused since, but in older databases) is no final
        entries.append(or_(Submission.rerun_of.is_not(None), Team.is_baseline))
    entrant = case((Team.is_baseline, -Submission.id), else_=Submission.team_id)
    query = select(
        Submission.id,
        Submission.name,
        Submission.average,
        Submission.scores,
        Submission.costs,
        Submission.created_at,
        Team.name.label("team"),
        Team.is_baseline,
        func.row_number().over(partition_by=entrant, order_by=order).label("position"),
    ).join(Team, Submission.team_id == Team.id)
    if final:
        query = query.outerjoin(source, source.id == Submission.rerun_of)
    numbered = query.where(*entries).subquery()
    chosen = session.execute(select(numbered).where(numbered.c.position == 1)).all()
    visible = phase.scores_visible
    # While a phase hides its scores the order would give them away: list by time, unranked.
    ranked = sorted(
        chosen,
        key=lambda s: ((-(s.average or 0),) if visible else ()) + (s.created_at, s.id),
    )
    task_names = [t.name for t in phase.tasks]
    return [
        BoardRow(
            rank=rank if visible else None,
            submission_id=s.id,
            name=s.name,
            team=s.team,
            baseline=s.is_baseline,
            average=s.average if visible else None,
            scores={t: (s.scores or {}).get(t) if visible else None for t in task_names},
            submitted_at=s.created_at,
            costs=s.costs or {},
        )
        for rank, s in enumerate(ranked, start=1)
    ]


def score_history(
    session: Session, phase: Phase, teams: Collection[str]
) -> list[tuple[str, bool, dt.datetime, float]]:
    """Every scored, qualified submission of ``teams`` in the phase as (team, is baseline,
    submitted at, average), oldest first, for the progress chart; empty while the phase hides
    scores."""
    if not phase.scores_visible or not teams:
        return []
    rows = session.execute(
        select(Team.name, Team.is_baseline, Submission.created_at, Submission.average)
        .join(Team, Submission.team_id == Team.id)
        .where(
            Submission.phase_id == phase.id,
            Submission.status == "scored",
            Submission.disqualified.is_(False),
            Submission.average.is_not(None),
            Team.name.in_(list(teams)),
        )
        .order_by(Submission.created_at, Submission.id)
    )
    return [(r.name, r.is_baseline, r.created_at, r.average) for r in rows]


def efficiency_board(
    session: Session, phase: Phase, best: list[BoardRow] | None = None
) -> list[BoardRow]:
    """The efficiency track: each team's best submission that beats every baseline's average,
    ranked by what its run cost (seconds of merge and inference together), ties by score. Empty
    while the phase hides scores; with no baseline, every scored team qualifies. ``best``: the
    phase's board in mode ``best``, where the caller has it already."""
    if not phase.scores_visible:
        return []
    rows = best if best is not None else leaderboard(session, phase, "best")
    bar = max((r.average or 0.0 for r in rows if r.baseline), default=None)
    entrants = [
        r
        for r in rows
        if not r.baseline
        and r.average is not None
        and (bar is None or r.average > bar)
        and r.costs.get("seconds") is not None
    ]
    entrants.sort(key=lambda r: (r.costs["seconds"], -(r.average or 0.0), r.submitted_at))
    return [replace(row, rank=rank) for rank, row in enumerate(entrants, start=1)]
