"""The JSON API under ``/api``, in three routers by who may call: anyone, a team (its API token
as ``Authorization: Bearer``), and the organizer (the organizer token the server started with)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Request, UploadFile
from pydantic import BaseModel, Field
from sqlalchemy.orm import Session

from mergearena.arena import service
from mergearena.arena.db import Submission, Team
from mergearena.arena.web.deps import (
    ArenaSettings,
    AuthorizationHeader,
    OrganizerOnly,
    SessionDep,
    SettingsDep,
    TeamDep,
    may_read,
    only_competition,
    read_upload,
    reads_privately,
    register_team,
    viewer,
)
from mergearena.arena.web.limits import takes_upload
from mergearena.arena.web.schemas import (
    BoardRowOut,
    CalibrationOut,
    CompetitionOut,
    LeaderboardOut,
    MeOut,
    PrivateSubmissionOut,
    QueuedOut,
    RegisteredOut,
    SubmissionOut,
    TaskOut,
    TokenOut,
    WinnersOut,
    WriteupOut,
    submission_out,
    winners_out,
)
from mergearena.errors import NotFoundError


class CompetitionIn(service.CompetitionSpec):
    phases: list[dict[str, str]] = Field(
        default_factory=lambda: [
            {"name": "validation", "kind": "validation"},
            {"name": "public-test", "kind": "public_test"},
            {"name": "final", "kind": "final"},
        ]
    )


class TeamIn(BaseModel):
    name: str


class FinalChoice(BaseModel):
    submission_id: int  # the team's submission whose files the finals run


class WinnerIn(BaseModel):
    track: str = Field(description="performance, efficiency or creative")
    submission_id: int
    place: int = 1


def get_submission(session: SessionDep, submission_id: int) -> Submission:
    submission = session.get(Submission, submission_id)
    if submission is None:
        raise NotFoundError(f"no submission {submission_id}")
    return submission


def submit_upload(
    session: Session,
    settings: ArenaSettings,
    team: Team,
    file: UploadFile,
    competition: str | None,
    phase: str | None,
    name: str | None,
) -> Submission:
    """Queue an uploaded file as the team's submission (named after the file by default)."""
    content = read_upload(file)
    found = service.get_phase(only_competition(session, competition), phase)
    file_name = file.filename or "submission"
    return service.submit(
        session, settings.data_dir, team, found, name or file_name, file_name, content
    )


# ------------------------------------------------------------------------------------- anyone

public = APIRouter(prefix="/api", tags=["public"])


@public.get("/competitions")
def list_competitions(session: SessionDep) -> list[CompetitionOut]:
    return [CompetitionOut.model_validate(c) for c in service.competitions(session)]


@public.get("/competitions/{slug}")
def get_competition(slug: str, session: SessionDep) -> CompetitionOut:
    return CompetitionOut.model_validate(service.get_competition(session, slug))


@public.get("/competitions/{slug}/winners")
def list_winners(slug: str, session: SessionDep) -> WinnersOut:
    """Every track's winners, with their write-ups (public once a submission wins)."""
    competition = service.get_competition(session, slug)
    return winners_out(competition, service.winners(session, competition))


@public.get("/leaderboard")
def leaderboard(
    session: SessionDep,
    competition: str | None = None,
    phase: str | None = None,
    mode: str | None = None,
) -> LeaderboardOut:
    found = service.get_phase(only_competition(session, competition), phase)
    rows = service.leaderboard(session, found, mode)
    mode = mode or found.competition.board_mode
    best = rows if mode == "best" else None
    efficiency = service.efficiency_board(session, found, best)
    return LeaderboardOut(
        competition=found.competition.slug,
        phase=found.name,
        scores_visible=found.scores_visible,
        tasks=[t.name for t in found.tasks],
        rows=[BoardRowOut.model_validate(r) for r in rows],
        efficiency=[BoardRowOut.model_validate(r) for r in efficiency],
    )


@public.post("/teams", status_code=201)
def register(body: TeamIn, request: Request, session: SessionDep) -> RegisteredOut:
    team, token = register_team(request, session, body.name)
    return RegisteredOut(team=team.name, token=token)


@public.get("/submissions/{submission_id}")
def read_submission(
    submission_id: int,
    request: Request,
    session: SessionDep,
    authorization: AuthorizationHeader = None,
) -> PrivateSubmissionOut | SubmissionOut:
    """For its team and the organizer: all of it (its final pick, file, attempts and log).
    For anyone else: its public side once it is scored in a phase that shows its scores; until
    then it does not exist to them."""
    submission = get_submission(session, submission_id)
    reader = viewer(request, session, authorization)
    if not may_read(reader, submission):
        raise NotFoundError(f"no submission {submission_id}")
    return submission_out(submission, private=reads_privately(reader, submission))


# ----------------------------------------------------------------------------------- a team

team = APIRouter(prefix="/api", tags=["team"])


@team.get("/teams/me")
def me(me: TeamDep, session: SessionDep) -> MeOut:
    submissions = service.team_submissions(session, me)
    return MeOut(team=me.name, submissions=[submission_out(s, private=True) for s in submissions])


@team.post("/teams/me/token")
def rotate_token(me: TeamDep, session: SessionDep) -> TokenOut:
    return TokenOut(team=me.name, token=service.rotate_token(session, me))


@team.post("/teams/me/final")
def choose_final(me: TeamDep, session: SessionDep, choice: FinalChoice) -> PrivateSubmissionOut:
    chosen = service.choose_final(session, me, choice.submission_id)
    return submission_out(chosen, private=True)


@team.post("/submissions", status_code=201)
@takes_upload
def submit(
    me: TeamDep,
    session: SessionDep,
    settings: SettingsDep,
    file: Annotated[UploadFile, File()],
    name: Annotated[str | None, Form()] = None,
    competition: Annotated[str | None, Form()] = None,
    phase: Annotated[str | None, Form()] = None,
) -> PrivateSubmissionOut:
    submission = submit_upload(session, settings, me, file, competition, phase, name)
    return submission_out(submission, private=True)


@team.post("/submissions/{submission_id}/writeup", status_code=201)
@takes_upload
def attach_writeup(
    submission_id: int,
    me: TeamDep,
    session: SessionDep,
    settings: SettingsDep,
    file: Annotated[UploadFile, File(description="Markdown (.md) or PDF (.pdf), up to 4 MiB")],
) -> WriteupOut:
    """Attach (or replace) a submission's write-up, for the creative track."""
    content = read_upload(file)
    writeup = service.attach_writeup(
        session, settings.data_dir, me, submission_id, file.filename or "writeup", content
    )
    return WriteupOut.of(writeup)


# ---------------------------------------------------------------------------- the organizer

organizer = APIRouter(prefix="/api", tags=["organizer"], dependencies=OrganizerOnly)


@organizer.post("/competitions", status_code=201)
def create_competition(body: CompetitionIn, session: SessionDep) -> CompetitionOut:
    spec = service.CompetitionSpec(**body.model_dump(exclude={"phases"}))
    competition = service.create_competition(session, spec)
    for phase in body.phases:
        service.add_phase(session, competition, phase["name"], phase["kind"])
    return CompetitionOut.model_validate(competition)


@organizer.post("/competitions/{slug}/phases", status_code=201)
def add_phase(
    slug: str,
    session: SessionDep,
    name: Annotated[str, Form()],
    kind: Annotated[str, Form()],
) -> CompetitionOut:
    competition = service.get_competition(session, slug)
    service.add_phase(session, competition, name, kind)
    return CompetitionOut.model_validate(competition)


@organizer.post("/competitions/{slug}/phases/{phase}/tasks", status_code=201)
@takes_upload
def add_task(
    slug: str,
    phase: str,
    session: SessionDep,
    settings: SettingsDep,
    name: Annotated[str, Form()],
    file: Annotated[UploadFile, File()],
) -> TaskOut:
    found = service.get_phase(service.get_competition(session, slug), phase)
    task = service.add_task(session, settings.data_dir, found, name, read_upload(file))
    return TaskOut.model_validate(task)


@organizer.post("/competitions/{slug}/calibration", status_code=201)
@takes_upload
def add_calibration(
    slug: str,
    session: SessionDep,
    settings: SettingsDep,
    name: Annotated[str, Form()],
    file: Annotated[UploadFile, File()],
) -> CalibrationOut:
    competition = service.get_competition(session, slug)
    content = read_upload(file)
    added = service.add_calibration(session, settings.data_dir, competition, name, content)
    return CalibrationOut.model_validate(added)


@organizer.post("/baselines", status_code=201)
@takes_upload
def submit_baseline(
    session: SessionDep,
    settings: SettingsDep,
    file: Annotated[UploadFile, File()],
    name: Annotated[str | None, Form()] = None,
    competition: Annotated[str | None, Form()] = None,
    phase: Annotated[str | None, Form()] = None,
) -> PrivateSubmissionOut:
    """Queue an organizer's baseline: ranked as its own entrant, marked as a baseline, the bar
    the efficiency track's entries must beat; no daily limit."""
    team = service.baseline_team(session)
    submission = submit_upload(session, settings, team, file, competition, phase, name)
    return submission_out(submission, private=True)


@organizer.post("/competitions/{slug}/finals")
def run_finals(slug: str, session: SessionDep) -> QueuedOut:
    queued = service.run_finals(session, service.get_competition(session, slug))
    return QueuedOut(queued=[submission_out(s, private=True) for s in queued])


@organizer.post("/competitions/{slug}/phases/{phase}/close")
def close_phase(slug: str, phase: str, session: SessionDep) -> CompetitionOut:
    competition = service.get_competition(session, slug)
    service.close_phase(session, service.get_phase(competition, phase))
    return CompetitionOut.model_validate(competition)


@organizer.post("/submissions/{submission_id}/{action}")
def organize(submission_id: int, action: str, session: SessionDep) -> PrivateSubmissionOut:
    """``rerun``, ``disqualify`` or ``requalify`` a submission."""
    submission = get_submission(session, submission_id)
    service.organize(session, submission, action)
    return submission_out(submission, private=True)


@organizer.post("/competitions/{slug}/winners")
def mark_winner(slug: str, body: WinnerIn, session: SessionDep) -> WinnersOut:
    competition = service.get_competition(session, slug)
    service.mark_winner(session, competition, body.track, body.submission_id, body.place)
    return winners_out(competition, service.winners(session, competition))


@organizer.delete("/competitions/{slug}/winners/{track}/{submission_id}")
def unmark_winner(slug: str, track: str, submission_id: int, session: SessionDep) -> WinnersOut:
    competition = service.get_competition(session, slug)
    service.unmark_winner(session, competition, track, submission_id)
    return winners_out(competition, service.winners(session, competition))
