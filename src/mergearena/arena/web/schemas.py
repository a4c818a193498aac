"""What the JSON API returns: one pydantic model per shape, so ``/docs`` shows every schema and a
response can never carry a field its model does not name (a private log in a public view)."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal, overload

from pydantic import BaseModel, ConfigDict, Field, PlainSerializer

from mergearena.arena.db import Award, Competition, Submission, Writeup

# The database keeps naive UTC; the API says so ("...Z").
UtcTime = Annotated[
    dt.datetime, PlainSerializer(lambda value: value.isoformat() + "Z", return_type=str)
]


class _FromRows(BaseModel):
    """A model read from a database object's attributes (``Model.model_validate(row)``)."""

    model_config = ConfigDict(from_attributes=True)


class TaskOut(_FromRows):
    name: str
    examples: int
    main_metric: str


class CalibrationOut(_FromRows):
    name: str  # read in a job at $MERGEARENA_CALIBRATION/<name>.csv
    examples: int


class PhaseOut(_FromRows):
    name: str
    kind: str
    closed: bool
    scores_visible: bool
    tasks: list[TaskOut]


class CompetitionOut(_FromRows):
    slug: str
    name: str
    rules: str
    allowed_models: list[str]
    max_parameters: int | None
    time_limit_seconds: int
    memory_limit_bytes: int | None
    daily_submissions: int
    mc_rule: str
    fewshot: int | None
    cot: dict[str, Any] | None
    board_mode: str
    calibration: list[CalibrationOut]
    phases: list[PhaseOut]


class Costs(BaseModel):
    """What a run cost: measured by the worker outside the sandbox (``seconds``, ``gpu_seconds``,
    ``peak_rss_bytes``) or reported by the run itself (the rest). Absent: not recorded."""

    seconds: float | None = None  # merge and inference together
    gpu_seconds: float | None = None
    peak_rss_bytes: int | None = None  # of the run's largest process
    merge_seconds: float | None = None
    parameters: int | None = None  # of the merged model
    peak_gpu_bytes: int | None = None


class SubmissionOut(BaseModel):
    """A submission as anyone may see it (``service.is_public``); scores only where its phase
    shows them, to its own team too: while they are hidden, nothing shown depends on them."""

    id: int
    name: str
    team: str
    competition: str
    phase: str
    kind: str
    status: str
    disqualified: bool
    submitted_at: UtcTime
    finished_at: UtcTime | None
    average: float | None
    scores: dict[str, Any] | None
    rerun_of: int | None


class PrivateSubmissionOut(SubmissionOut):
    """A submission as its team and the organizer see it: its final pick, file, attempts and
    log too (a rival who saw the pick would know which entry the finals run)."""

    is_final: bool
    file_name: str
    file_sha256: str
    attempts: int
    error: str | None
    log: str


@overload
def submission_out(submission: Submission, *, private: Literal[True]) -> PrivateSubmissionOut: ...
@overload
def submission_out(submission: Submission, *, private: bool) -> SubmissionOut: ...
def submission_out(submission: Submission, *, private: bool) -> SubmissionOut:
    visible = submission.phase.scores_visible
    public = SubmissionOut(
        id=submission.id,
        name=submission.name,
        team=submission.team.name,
        competition=submission.phase.competition.slug,
        phase=submission.phase.name,
        kind=submission.kind,
        status=submission.status,
        disqualified=submission.disqualified,
        submitted_at=submission.created_at,
        finished_at=submission.finished_at,
        average=submission.average if visible else None,
        scores=submission.scores if visible else None,
        rerun_of=submission.rerun_of,
    )
    if not private:
        return public
    return PrivateSubmissionOut(
        **dict(public),  # the field values as they are (model_dump would serialize the times)
        is_final=submission.is_final,
        file_name=submission.file_name,
        file_sha256=submission.file_sha256,
        attempts=submission.attempts,
        error=submission.error,
        log=submission.log,
    )


class BoardRowOut(_FromRows):
    """A row of ``service.leaderboard`` (its ``costs`` keep only the keys ``Costs`` names)."""

    rank: int | None  # None while the phase hides scores
    submission_id: int
    name: str
    team: str
    baseline: bool
    average: float | None  # None while the phase hides scores
    scores: dict[str, float | None]
    submitted_at: UtcTime
    costs: Costs


class LeaderboardOut(BaseModel):
    competition: str
    phase: str
    scores_visible: bool
    tasks: list[str]
    rows: list[BoardRowOut]
    efficiency: list[BoardRowOut] = Field(
        description="the efficiency track: each team's best submission that beats every "
        "baseline, cheapest run first"
    )


class RegisteredOut(BaseModel):
    team: str
    token: str
    note: str = "the token is shown only once"


class TokenOut(BaseModel):
    team: str
    token: str


class MeOut(BaseModel):
    team: str
    submissions: list[PrivateSubmissionOut]


class QueuedOut(BaseModel):
    queued: list[PrivateSubmissionOut]


class WriteupOut(BaseModel):
    submission_id: int
    format: str  # markdown or pdf
    file_name: str
    size_bytes: int
    title: str | None  # a Markdown write-up's first heading
    url: str  # the page that shows it (a Markdown one rendered, a PDF as a download)
    attached_at: UtcTime

    @classmethod
    def of(cls, writeup: Writeup) -> WriteupOut:
        return cls(
            submission_id=writeup.submission_id,
            format=writeup.format,
            file_name=writeup.file_name,
            size_bytes=writeup.size_bytes,
            title=writeup.title,
            url=f"/writeups/{writeup.submission_id}",
            attached_at=writeup.created_at,
        )


def _writeup_out(writeup: Writeup | None) -> WriteupOut | None:
    return None if writeup is None else WriteupOut.of(writeup)


class WinnerOut(BaseModel):
    track: str
    place: int
    submission: SubmissionOut
    writeup: WriteupOut | None


class WinnersOut(BaseModel):
    competition: str
    tracks: dict[str, list[WinnerOut]]  # every track, by place; empty until marked


def winners_out(competition: Competition, by_track: dict[str, list[Award]]) -> WinnersOut:
    return WinnersOut(
        competition=competition.slug,
        tracks={
            track: [
                WinnerOut(
                    track=track,
                    place=award.place,
                    submission=submission_out(award.submission, private=False),
                    writeup=_writeup_out(award.submission.writeup),
                )
                for award in awards
            ]
            for track, awards in by_track.items()
        },
    )
