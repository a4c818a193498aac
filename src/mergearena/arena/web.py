"""The arena's web app: a JSON API under ``/api`` (OpenAPI docs at ``/docs``) and server-rendered
pages (leaderboards, a submission form, team and organizer pages) that call the same service code.

Teams authenticate with their API token (``Authorization: Bearer``, or a form field that sets an
HTTP-only cookie); the organizer with the organizer token the server was started with. Jinja2
escapes every value it renders, so team names, submission names and logs are shown as text.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, File, Form, Header, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from mergearena.arena import service
from mergearena.arena.db import BOARD_MODES, PHASE_KINDS, Competition, Phase, Submission, Team
from mergearena.errors import ArenaError, AuthError, LimitError, MergeArenaError, NotFoundError
from mergearena.evaluation.tasks import MC_RULES

TEAM_COOKIE = "mergearena_team"
ORGANIZER_COOKIE = "mergearena_organizer"
COT_EXAMPLE = '{"max_new_tokens": 256, "fallbacks": ["answer-colon"]}'
# How each multiple-choice rule asks, for the competition page (evaluation/strategies.py).
MC_RULE_NOTES = {
    "loglik": "the choice whose tokens the model finds most likely after the question",
    "starter-kit": "the starter kit's own rule: each choice's tokens after its first scored",
    "letter": "the options lettered A, B, C...; the letter the model finds most likely",
    "cot": "the options lettered; the model reasons step by step, then its answer letter is "
    "read from the text, and a reasoning without one counts wrong",
}


@dataclass
class ArenaSettings:
    sessions: sessionmaker
    data_dir: Path
    organizer_token: str | None = None  # None: no organizer actions over HTTP


def _status(error: MergeArenaError) -> int:
    if isinstance(error, AuthError):
        return 401
    if isinstance(error, NotFoundError):
        return 404
    if isinstance(error, LimitError):
        return 429
    return 400


def get_session(request: Request) -> Iterator[Session]:
    """One session per request, committed when the handler succeeds and before the response is
    sent (scope "function"): a client told "queued" can read its submission back at once, and a
    failed commit is an error response, never a success for a change that was lost."""
    with request.app.state.settings.sessions() as session:
        yield session
        session.commit()


SessionDep = Annotated[Session, Depends(get_session, scope="function")]


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


def _competition_json(competition: Competition) -> dict[str, Any]:
    return {
        "slug": competition.slug,
        "name": competition.name,
        "rules": competition.rules,
        "allowed_models": competition.allowed_models,
        "max_parameters": competition.max_parameters,
        "time_limit_seconds": competition.time_limit_seconds,
        "memory_limit_bytes": competition.memory_limit_bytes,
        "daily_submissions": competition.daily_submissions,
        "mc_rule": competition.mc_rule,
        "fewshot": competition.fewshot,
        "cot": competition.cot,
        "board_mode": competition.board_mode,
        "calibration": [{"name": f.name, "examples": f.examples} for f in competition.calibration],
        "phases": [
            {
                "name": p.name,
                "kind": p.kind,
                "closed": p.closed,
                "scores_visible": p.scores_visible,
                "tasks": [
                    {"name": t.name, "examples": t.examples, "main_metric": t.main_metric}
                    for t in p.tasks
                ],
            }
            for p in competition.phases
        ],
    }


def _submission_json(submission: Submission, *, private: bool) -> dict[str, Any]:
    visible = submission.phase.scores_visible
    data = {
        "id": submission.id,
        "name": submission.name,
        "team": submission.team.name,
        "competition": submission.phase.competition.slug,
        "phase": submission.phase.name,
        "kind": submission.kind,
        "status": submission.status,
        "disqualified": submission.disqualified,
        "submitted_at": submission.created_at.isoformat() + "Z",
        "finished_at": submission.finished_at.isoformat() + "Z" if submission.finished_at else None,
        "average": submission.average if visible else None,
        "scores": submission.scores if visible else None,
        "is_final": submission.is_final,
        "rerun_of": submission.rerun_of,
    }
    if private:
        data.update(
            file_name=submission.file_name,
            file_sha256=submission.file_sha256,
            attempts=submission.attempts,
            error=submission.error,
            log=submission.log,
        )
    return data


async def _read_upload(upload: UploadFile) -> bytes:
    """Read at most the upload limit (plus one byte, to tell that it was over)."""
    data = await upload.read(service.MAX_UPLOAD_BYTES + 1)
    if len(data) > service.MAX_UPLOAD_BYTES:
        raise service.SubmissionError(
            f"the upload is over {service.MAX_UPLOAD_BYTES} bytes; submit a recipe or code, "
            "not model weights: models are named by reference"
        )
    return data


def _only_competition(session: Session, slug: str | None) -> Competition:
    if slug:
        return service.get_competition(session, slug)
    competitions = session.scalars(select(Competition)).all()
    if len(competitions) != 1:
        names = ", ".join(c.slug for c in competitions) or "none"
        raise ArenaError(f"name the competition (there are several or none: {names})")
    return competitions[0]


def create_app(settings: ArenaSettings) -> FastAPI:
    app = FastAPI(
        title="mergearena",
        description="The LLM merging competition service: submissions, queue, leaderboards.",
    )
    templates = Jinja2Templates(directory=str(Path(__file__).with_name("templates")))

    app.state.settings = settings

    def bearer(authorization: str | None) -> str | None:
        if authorization and authorization.lower().startswith("bearer "):
            return authorization[7:].strip()
        return None

    def team_of(session: Session, request: Request, authorization: str | None) -> Team:
        return service.team_for_token(
            session, bearer(authorization) or request.cookies.get(TEAM_COOKIE)
        )

    def check_organizer(request: Request, authorization: str | None) -> None:
        given = bearer(authorization) or request.cookies.get(ORGANIZER_COOKIE) or ""
        expected = settings.organizer_token
        if not expected or not secrets.compare_digest(given.encode(), expected.encode()):
            raise AuthError("this needs the organizer token the server was started with")

    def wants_html(request: Request) -> bool:
        return not request.url.path.startswith("/api/")

    @app.exception_handler(MergeArenaError)  # a bad task file or recipe too, not only ours
    async def arena_error(request: Request, error: MergeArenaError) -> Any:
        status = _status(error)
        if wants_html(request):
            return templates.TemplateResponse(
                request, "error.html", {"message": str(error)}, status_code=status
            )
        return JSONResponse({"detail": str(error)}, status_code=status)

    # ---------------------------------------------------------------------------- JSON API

    @app.get("/api/competitions")
    def api_competitions(session: SessionDep) -> list[dict[str, Any]]:
        return [_competition_json(c) for c in session.scalars(select(Competition))]

    @app.get("/api/competitions/{slug}")
    def api_competition(slug: str, session: SessionDep) -> dict[str, Any]:
        return _competition_json(service.get_competition(session, slug))

    @app.post("/api/competitions", status_code=201)
    def api_create_competition(
        body: CompetitionIn,
        request: Request,
        session: SessionDep,
        authorization: Annotated[str | None, Header()] = None,
    ) -> dict[str, Any]:
        check_organizer(request, authorization)
        spec = service.CompetitionSpec(**body.model_dump(exclude={"phases"}))
        competition = service.create_competition(session, spec)
        for phase in body.phases:
            service.add_phase(session, competition, phase["name"], phase["kind"])
        return _competition_json(competition)

    @app.post("/api/competitions/{slug}/phases", status_code=201)
    def api_add_phase(
        slug: str,
        request: Request,
        session: SessionDep,
        name: Annotated[str, Form()],
        kind: Annotated[str, Form()],
        authorization: Annotated[str | None, Header()] = None,
    ) -> dict[str, Any]:
        check_organizer(request, authorization)
        competition = service.get_competition(session, slug)
        service.add_phase(session, competition, name, kind)
        return _competition_json(competition)

    @app.post("/api/competitions/{slug}/phases/{phase}/tasks", status_code=201)
    async def api_add_task(
        slug: str,
        phase: str,
        request: Request,
        session: SessionDep,
        name: Annotated[str, Form()],
        file: Annotated[UploadFile, File()],
        authorization: Annotated[str | None, Header()] = None,
    ) -> dict[str, Any]:
        check_organizer(request, authorization)
        found = service.get_phase(service.get_competition(session, slug), phase)
        task = service.add_task(session, settings.data_dir, found, name, await _read_upload(file))
        return {"name": task.name, "examples": task.examples, "main_metric": task.main_metric}

    @app.post("/api/competitions/{slug}/calibration", status_code=201)
    async def api_add_calibration(
        slug: str,
        request: Request,
        session: SessionDep,
        name: Annotated[str, Form()],
        file: Annotated[UploadFile, File()],
        authorization: Annotated[str | None, Header()] = None,
    ) -> dict[str, Any]:
        check_organizer(request, authorization)
        competition = service.get_competition(session, slug)
        content = await _read_upload(file)
        added = service.add_calibration(session, settings.data_dir, competition, name, content)
        return {"name": added.name, "examples": added.examples}

    @app.post("/api/competitions/{slug}/finals")
    def api_run_finals(
        slug: str,
        request: Request,
        session: SessionDep,
        authorization: Annotated[str | None, Header()] = None,
    ) -> dict[str, Any]:
        check_organizer(request, authorization)
        queued = service.run_finals(session, service.get_competition(session, slug))
        return {"queued": [_submission_json(s, private=True) for s in queued]}

    @app.post("/api/competitions/{slug}/phases/{phase}/close")
    def api_close_phase(
        slug: str,
        phase: str,
        request: Request,
        session: SessionDep,
        authorization: Annotated[str | None, Header()] = None,
    ) -> dict[str, Any]:
        check_organizer(request, authorization)
        competition = service.get_competition(session, slug)
        service.close_phase(session, service.get_phase(competition, phase))
        return _competition_json(competition)

    @app.post("/api/teams", status_code=201)
    def api_register(body: TeamIn, session: SessionDep) -> dict[str, Any]:
        team, token = service.register_team(session, body.name)
        return {"team": team.name, "token": token, "note": "the token is shown only once"}

    @app.get("/api/teams/me")
    def api_me(
        request: Request,
        session: SessionDep,
        authorization: Annotated[str | None, Header()] = None,
    ) -> dict[str, Any]:
        team = team_of(session, request, authorization)
        return {
            "team": team.name,
            "submissions": [
                _submission_json(s, private=True) for s in service.team_submissions(session, team)
            ],
        }

    @app.post("/api/teams/me/token")
    def api_rotate(
        request: Request,
        session: SessionDep,
        authorization: Annotated[str | None, Header()] = None,
    ) -> dict[str, Any]:
        team = team_of(session, request, authorization)
        return {"team": team.name, "token": service.rotate_token(session, team)}

    @app.post("/api/teams/me/final")
    def api_choose_final(
        request: Request,
        session: SessionDep,
        choice: FinalChoice,
        authorization: Annotated[str | None, Header()] = None,
    ) -> dict[str, Any]:
        team = team_of(session, request, authorization)
        chosen = service.choose_final(session, team, choice.submission_id)
        return _submission_json(chosen, private=True)

    @app.post("/api/submissions", status_code=201)
    async def api_submit(
        request: Request,
        session: SessionDep,
        file: Annotated[UploadFile, File()],
        name: Annotated[str | None, Form()] = None,
        competition: Annotated[str | None, Form()] = None,
        phase: Annotated[str | None, Form()] = None,
        authorization: Annotated[str | None, Header()] = None,
    ) -> dict[str, Any]:
        team = team_of(session, request, authorization)
        content = await _read_upload(file)
        found = service.get_phase(_only_competition(session, competition), phase)
        file_name = file.filename or "submission"
        submission = service.submit(
            session, settings.data_dir, team, found, name or file_name, file_name, content
        )
        return _submission_json(submission, private=True)

    @app.get("/api/submissions/{submission_id}")
    def api_submission(
        submission_id: int,
        request: Request,
        session: SessionDep,
        authorization: Annotated[str | None, Header()] = None,
    ) -> dict[str, Any]:
        submission = session.get(Submission, submission_id)
        if submission is None:
            raise NotFoundError(f"no submission {submission_id}")
        try:
            check_organizer(request, authorization)
            private = True
        except AuthError:
            private = team_of(session, request, authorization).id == submission.team_id
        return _submission_json(submission, private=private)

    @app.post("/api/submissions/{submission_id}/{action}")
    def api_organize(
        submission_id: int,
        action: str,
        request: Request,
        session: SessionDep,
        authorization: Annotated[str | None, Header()] = None,
    ) -> dict[str, Any]:
        check_organizer(request, authorization)
        submission = session.get(Submission, submission_id)
        if submission is None:
            raise NotFoundError(f"no submission {submission_id}")
        if action == "rerun":
            service.rerun(session, submission)
        elif action in ("disqualify", "requalify"):
            service.disqualify(session, submission, action == "disqualify")
        else:
            raise NotFoundError(f"no action {action!r}; use rerun, disqualify or requalify")
        return _submission_json(submission, private=True)

    @app.get("/api/leaderboard")
    def api_leaderboard(
        session: SessionDep,
        competition: str | None = None,
        phase: str | None = None,
        mode: str | None = None,
    ) -> dict[str, Any]:
        found = service.get_phase(_only_competition(session, competition), phase)
        rows = service.leaderboard(session, found, mode)
        return {
            "competition": found.competition.slug,
            "phase": found.name,
            "scores_visible": found.scores_visible,
            "tasks": [t.name for t in found.tasks],
            "rows": [r.as_json() for r in rows],
            "efficiency": [r.as_json() for r in service.efficiency_board(session, found)],
        }

    # ------------------------------------------------------------------------------- pages

    def page(request: Request, name: str, **context: Any) -> HTMLResponse:
        return templates.TemplateResponse(request, name, context)

    @app.get("/", response_class=HTMLResponse)
    def index(request: Request, session: SessionDep) -> HTMLResponse:
        return page(request, "index.html", competitions=session.scalars(select(Competition)).all())

    @app.get("/c/{slug}", response_class=HTMLResponse)
    def board_page(
        slug: str, request: Request, session: SessionDep, phase: str | None = None
    ) -> HTMLResponse:
        competition = service.get_competition(session, slug)
        found = service.get_phase(competition, phase)
        rows = service.leaderboard(session, found)
        return page(
            request,
            "leaderboard.html",
            competition=competition,
            phase=found,
            rows=rows,
            efficiency=service.efficiency_board(session, found),
            mc_rule_note=MC_RULE_NOTES.get(competition.mc_rule, ""),
        )

    @app.get("/submit", response_class=HTMLResponse)
    def submit_form(request: Request, session: SessionDep) -> HTMLResponse:
        competitions = session.scalars(select(Competition)).all()
        return page(request, "submit.html", competitions=competitions)

    @app.post("/submit", response_class=HTMLResponse)
    async def submit_page(
        request: Request,
        session: SessionDep,
        file: Annotated[UploadFile, File()],
        competition: Annotated[str, Form()],
        token: Annotated[str, Form()] = "",
        name: Annotated[str, Form()] = "",
        phase: Annotated[str, Form()] = "",
    ) -> HTMLResponse:
        team = service.team_for_token(session, token or request.cookies.get(TEAM_COOKIE))
        content = await _read_upload(file)
        found = service.get_phase(service.get_competition(session, competition), phase or None)
        file_name = file.filename or "submission"
        submission = service.submit(
            session, settings.data_dir, team, found, name or file_name, file_name, content
        )
        response = page(request, "submitted.html", submission=submission)
        if token:
            response.set_cookie(TEAM_COOKIE, token, httponly=True, samesite="strict")
        return response

    @app.get("/register", response_class=HTMLResponse)
    def register_form(request: Request) -> HTMLResponse:
        return page(request, "register.html", token=None)

    @app.post("/register", response_class=HTMLResponse)
    def register_page(
        request: Request, session: SessionDep, name: Annotated[str, Form()]
    ) -> HTMLResponse:
        team, token = service.register_team(session, name)
        response = page(request, "register.html", team=team, token=token)
        response.set_cookie(TEAM_COOKIE, token, httponly=True, samesite="strict")
        return response

    @app.get("/team", response_class=HTMLResponse)
    def team_page(request: Request, session: SessionDep) -> HTMLResponse:
        token = request.cookies.get(TEAM_COOKIE)
        if not token:
            return page(request, "login.html", action="/team", who="team")
        team = service.team_for_token(session, token)
        submissions = service.team_submissions(session, team)
        return page(request, "team.html", team=team, submissions=submissions, token=None)

    @app.post("/team", response_class=HTMLResponse)
    def team_login(
        request: Request, session: SessionDep, token: Annotated[str, Form()]
    ) -> RedirectResponse:
        service.team_for_token(session, token)
        response = RedirectResponse("/team", status_code=303)
        response.set_cookie(TEAM_COOKIE, token.strip(), httponly=True, samesite="strict")
        return response

    @app.post("/team/rotate", response_class=HTMLResponse)
    def team_rotate(request: Request, session: SessionDep) -> HTMLResponse:
        team = service.team_for_token(session, request.cookies.get(TEAM_COOKIE))
        token = service.rotate_token(session, team)
        submissions = service.team_submissions(session, team)
        response = page(request, "team.html", team=team, submissions=submissions, token=token)
        response.set_cookie(TEAM_COOKIE, token, httponly=True, samesite="strict")
        return response

    @app.get("/admin", response_class=HTMLResponse)
    def admin_page(request: Request, session: SessionDep) -> HTMLResponse:
        try:
            check_organizer(request, None)
        except AuthError:
            return page(request, "login.html", action="/admin", who="organizer")
        competitions = session.scalars(select(Competition)).all()
        submissions = session.scalars(
            select(Submission).order_by(Submission.id.desc()).limit(200)
        ).all()
        return page(
            request,
            "admin.html",
            competitions=competitions,
            submissions=submissions,
            phase_kinds=PHASE_KINDS,
            board_modes=BOARD_MODES,
            mc_rules=MC_RULES,
        )

    @app.post("/admin")
    def admin_login(request: Request, token: Annotated[str, Form()]) -> RedirectResponse:
        response = RedirectResponse("/admin", status_code=303)
        response.set_cookie(ORGANIZER_COOKIE, token.strip(), httponly=True, samesite="strict")
        return response

    @app.post("/admin/competitions")
    def admin_competition(
        request: Request,
        session: SessionDep,
        slug: Annotated[str, Form()],
        name: Annotated[str, Form()],
        rules: Annotated[str, Form()] = "",
        allowed_models: Annotated[str, Form()] = "",
        daily_submissions: Annotated[int, Form()] = 1,
        time_limit_seconds: Annotated[int, Form()] = 3600,
        max_parameters_billions: Annotated[float | None, Form()] = None,  # empty: no limit
        memory_limit_gib: Annotated[float | None, Form()] = None,
        mc_rule: Annotated[str, Form()] = "loglik",
        fewshot: Annotated[int | None, Form()] = None,  # empty: each task's own
        cot: Annotated[str, Form()] = "",  # a JSON object of CotSettings keys; empty: the tasks'
        board_mode: Annotated[str, Form()] = "best",
        allow_unsandboxed: Annotated[bool, Form()] = False,
    ) -> RedirectResponse:
        check_organizer(request, None)
        try:
            cot_settings = json.loads(cot) if cot.strip() else None
        except json.JSONDecodeError as error:
            raise ArenaError(f"cot: not JSON ({error}); write e.g. {COT_EXAMPLE}") from None
        if cot_settings is not None and not isinstance(cot_settings, dict):
            raise ArenaError(f"cot: a JSON object of settings is needed, e.g. {COT_EXAMPLE}")
        competition = service.create_competition(
            session,
            service.CompetitionSpec(
                slug=slug,
                name=name,
                rules=rules,
                allowed_models=allowed_models.split(),
                daily_submissions=daily_submissions,
                time_limit_seconds=time_limit_seconds,
                max_parameters=(
                    None if max_parameters_billions is None else int(max_parameters_billions * 1e9)
                ),
                memory_limit_bytes=(
                    None if memory_limit_gib is None else int(memory_limit_gib * 2**30)
                ),
                mc_rule=mc_rule,
                fewshot=fewshot,
                cot=cot_settings,
                board_mode=board_mode,
                allow_unsandboxed=allow_unsandboxed,
            ),
        )
        service.add_phase(session, competition, "validation", "validation")
        return RedirectResponse("/admin", status_code=303)

    @app.post("/admin/phases")
    def admin_phase(
        request: Request,
        session: SessionDep,
        competition: Annotated[str, Form()],
        name: Annotated[str, Form()],
        kind: Annotated[str, Form()],
    ) -> RedirectResponse:
        check_organizer(request, None)
        service.add_phase(session, service.get_competition(session, competition), name, kind)
        return RedirectResponse("/admin", status_code=303)

    @app.post("/admin/tasks")
    async def admin_task(
        request: Request,
        session: SessionDep,
        competition: Annotated[str, Form()],
        phase: Annotated[str, Form()],
        name: Annotated[str, Form()],
        file: Annotated[UploadFile, File()],
    ) -> RedirectResponse:
        check_organizer(request, None)
        found = service.get_phase(service.get_competition(session, competition), phase)
        service.add_task(session, settings.data_dir, found, name, await _read_upload(file))
        return RedirectResponse("/admin", status_code=303)

    @app.post("/admin/phases/{phase_id}/close")
    def admin_close(phase_id: int, request: Request, session: SessionDep) -> RedirectResponse:
        check_organizer(request, None)
        found = session.get(Phase, phase_id)
        if found is None:
            raise NotFoundError(f"no phase {phase_id}")
        service.close_phase(session, found)
        return RedirectResponse("/admin", status_code=303)

    @app.post("/admin/submissions/{submission_id}/{action}")
    def admin_submission(
        submission_id: int, action: str, request: Request, session: SessionDep
    ) -> RedirectResponse:
        api_organize(submission_id, action, request, session, None)
        return RedirectResponse("/admin", status_code=303)

    return app
