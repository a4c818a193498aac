"""The server-rendered pages: leaderboards, the submission form, the team's and the organizer's
pages. They call the same service code as the API. Jinja2 escapes every value it renders, so
team names, submission names and logs are shown as text; no page needs JavaScript."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from sqlalchemy import select

from mergearena.arena import charts, service
from mergearena.arena.db import BOARD_MODES, PHASE_KINDS, TRACKS, Phase, Submission, Team
from mergearena.arena.web.api import get_submission, submit_upload
from mergearena.arena.web.deps import (
    ORGANIZER_COOKIE,
    TEAM_COOKIE,
    OrganizerOnly,
    SessionDep,
    SettingsDep,
    TeamDep,
    authenticate_team,
    current_team,
    get_settings,
    is_organizer,
    organizer_token_is,
    read_upload,
    reads_privately,
    register_team,
    viewer,
)
from mergearena.arena.web.limits import takes_upload
from mergearena.arena.writeups import render_markdown
from mergearena.errors import ArenaError, AuthError, NotFoundError
from mergearena.evaluation.tasks import MC_RULES

templates = Jinja2Templates(directory=str(Path(__file__).parent.with_name("templates")))
COT_EXAMPLE = '{"max_new_tokens": 256, "fallbacks": ["answer-colon"]}'
# How each multiple-choice rule asks, for the competition page (evaluation/strategies.py).
MC_RULE_NOTES = {
    "loglik": "the choice whose tokens the model finds most likely after the question",
    "starter-kit": "the starter kit's own rule: each choice's tokens after its first scored",
    "letter": "the options lettered A, B, C...; the letter the model finds most likely",
    "cot": "the options lettered; the model reasons step by step, then its answer letter is "
    "read from the text, and a reasoning without one counts wrong",
}
TRACK_NOTES = {
    "performance": "the best average score on the hidden final tasks",
    "efficiency": "the cheapest run among those that beat the organizer's baselines",
    "creative": "the most creative write-up",
}


def page(request: Request, name: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    return templates.TemplateResponse(request, name, context, status_code=status_code)


def _keep_cookie(request: Request, response: Response, name: str, token: str) -> None:
    """Sign the browser in: HTTP-only, same-site only, and sent over https only where the
    arena is served over https (as uvicorn sees the request, a trusted proxy's scheme too)."""
    secure = request.url.scheme == "https"
    response.set_cookie(name, token.strip(), httponly=True, samesite="strict", secure=secure)


def _to_admin() -> RedirectResponse:
    return RedirectResponse("/admin", status_code=303)


# ------------------------------------------------------------------------- anyone and teams

pages = APIRouter(include_in_schema=False)


@pages.get("/", response_class=HTMLResponse)
def index(request: Request, session: SessionDep) -> HTMLResponse:
    return page(request, "index.html", competitions=service.competitions(session))


@pages.get("/c/{slug}", response_class=HTMLResponse)
def board(
    slug: str, request: Request, session: SessionDep, phase: str | None = None
) -> HTMLResponse:
    competition = service.get_competition(session, slug)
    found = service.get_phase(competition, phase)
    rows = service.leaderboard(session, found)
    best = rows if competition.board_mode == "best" else service.leaderboard(session, found, "best")
    # The chart draws the teams with the best scores: only their histories are read.
    leaders = list(dict.fromkeys(r.team for r in best if r.average is not None))
    history = service.score_history(session, found, leaders[: charts.MAX_TEAMS])
    averages = [(r.average, r.baseline) for r in rows if r.average is not None]
    return page(
        request,
        "leaderboard.html",
        competition=competition,
        phase=found,
        rows=rows,
        efficiency=service.efficiency_board(session, found, best),
        mc_rule_note=MC_RULE_NOTES.get(competition.mc_rule, ""),
        progress_svg=charts.progress_svg([charts.Point(*row) for row in history]),
        chart_teams=charts.MAX_TEAMS,
        distribution_svg=charts.distribution_svg(
            [average for average, baseline in averages if not baseline],
            [average for average, baseline in averages if baseline],
        ),
    )


@pages.get("/c/{slug}/winners", response_class=HTMLResponse)
def winners(slug: str, request: Request, session: SessionDep) -> HTMLResponse:
    competition = service.get_competition(session, slug)
    return page(
        request,
        "winners.html",
        competition=competition,
        tracks=service.winners(session, competition),
        notes=TRACK_NOTES,
    )


@pages.get("/writeups/{submission_id}", response_model=None)
def writeup(submission_id: int, request: Request, session: SessionDep) -> Response:
    """A write-up: public once its submission wins a track, else for its team and the
    organizer (to anyone else it does not exist). Markdown is rendered without raw HTML; a PDF
    is a download, sandboxed."""
    submission = get_submission(session, submission_id)
    found = submission.writeup
    public = service.is_awarded(session, submission_id)
    if found is None or not (public or reads_privately(viewer(request, session), submission)):
        raise NotFoundError(f"submission {submission_id} has no write-up to show")
    content = service.blob_path(get_settings(request).data_dir, found.sha256).read_bytes()
    if found.format == "pdf":
        return Response(
            content,
            media_type="application/pdf",
            headers={
                "Content-Disposition": f'attachment; filename="writeup-{submission_id}.pdf"',
                "Content-Security-Policy": "sandbox",
            },
        )
    html = render_markdown(content.decode("utf-8"))
    return page(request, "writeup.html", submission=submission, writeup=found, html=html)


@pages.get("/submit", response_class=HTMLResponse)
def submit_form(request: Request, session: SessionDep) -> HTMLResponse:
    try:
        team = current_team(request, session)
    except AuthError:
        team = None
    return page(request, "submit.html", competitions=service.competitions(session), team=team)


@pages.post("/submit", response_class=HTMLResponse)
@takes_upload
def submit(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    me: TeamDep,
    file: Annotated[UploadFile, File()],
    competition: Annotated[str, Form()],
    name: Annotated[str, Form()] = "",
    phase: Annotated[str, Form()] = "",
) -> HTMLResponse:
    """The signed-in team's upload (its cookie, checked before the file is read: no token
    field in the form, see ``web/limits.py``)."""
    submission = submit_upload(
        session, settings, me, file, competition, phase or None, name or None
    )
    return page(request, "submitted.html", submission=submission)


@pages.get("/register", response_class=HTMLResponse)
def register_form(request: Request) -> HTMLResponse:
    return page(request, "register.html", token=None)


@pages.post("/register", response_class=HTMLResponse)
def register(request: Request, session: SessionDep, name: Annotated[str, Form()]) -> HTMLResponse:
    team, token = register_team(request, session, name)
    response = page(request, "register.html", team=team, token=token)
    _keep_cookie(request, response, TEAM_COOKIE, token)
    return response


def _team_page(
    request: Request, session: SessionDep, team: Team, token: str | None = None
) -> HTMLResponse:
    submissions = service.team_submissions(session, team)
    return page(request, "team.html", team=team, submissions=submissions, token=token)


@pages.get("/team", response_class=HTMLResponse)
def team(request: Request, session: SessionDep) -> HTMLResponse:
    token = request.cookies.get(TEAM_COOKIE)
    if not token:
        return page(request, "login.html", action="/team", who="team")
    return _team_page(request, session, authenticate_team(request, session, token))


@pages.post("/team", response_class=HTMLResponse)
def team_login(
    request: Request, session: SessionDep, token: Annotated[str, Form()]
) -> RedirectResponse:
    authenticate_team(request, session, token)
    response = RedirectResponse("/team", status_code=303)
    _keep_cookie(request, response, TEAM_COOKIE, token)
    return response


@pages.post("/team/rotate", response_class=HTMLResponse)
def team_rotate(request: Request, session: SessionDep, me: TeamDep) -> HTMLResponse:
    token = service.rotate_token(session, me)
    response = _team_page(request, session, me, token)
    _keep_cookie(request, response, TEAM_COOKIE, token)
    return response


def _to_team() -> RedirectResponse:
    return RedirectResponse("/team", status_code=303)


@pages.post("/team/writeup")
@takes_upload
def team_writeup(
    session: SessionDep,
    settings: SettingsDep,
    me: TeamDep,
    submission_id: Annotated[int, Form()],
    file: Annotated[UploadFile, File()],
) -> RedirectResponse:
    content = read_upload(file)
    service.attach_writeup(
        session, settings.data_dir, me, submission_id, file.filename or "writeup", content
    )
    return _to_team()


@pages.post("/team/final")
def team_final(
    session: SessionDep, me: TeamDep, submission_id: Annotated[int, Form()]
) -> RedirectResponse:
    service.choose_final(session, me, submission_id)
    return _to_team()


# ---------------------------------------------------------------------------- the organizer

admin = APIRouter(prefix="/admin", include_in_schema=False)
admin_actions = APIRouter(prefix="/admin", include_in_schema=False, dependencies=OrganizerOnly)


@admin.get("", response_class=HTMLResponse)
def admin_page(request: Request, session: SessionDep) -> HTMLResponse:
    if not is_organizer(request):
        return page(request, "login.html", action="/admin", who="organizer")
    submissions = session.scalars(select(Submission).order_by(Submission.id.desc()).limit(200))
    competitions = service.competitions(session)
    return page(
        request,
        "admin.html",
        competitions=competitions,
        winners={c.slug: service.winners(session, c) for c in competitions},
        tracks=TRACKS,
        submissions=submissions.all(),
        phase_kinds=PHASE_KINDS,
        board_modes=BOARD_MODES,
        mc_rules=MC_RULES,
    )


@admin.post("")
def admin_login(request: Request, token: Annotated[str, Form()]) -> RedirectResponse:
    """Sign in as the organizer: the token is checked here (a wrong one counts as a failed
    attempt), and only the right one is kept in the cookie."""
    if not organizer_token_is(request, token.strip()):
        raise AuthError("that is not the organizer token the server was started with")
    response = _to_admin()
    _keep_cookie(request, response, ORGANIZER_COOKIE, token)
    return response


@admin_actions.post("/competitions")
def new_competition(
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
            memory_limit_bytes=None if memory_limit_gib is None else int(memory_limit_gib * 2**30),
            mc_rule=mc_rule,
            fewshot=fewshot,
            cot=cot_settings,
            board_mode=board_mode,
            allow_unsandboxed=allow_unsandboxed,
        ),
    )
    service.add_phase(session, competition, "validation", "validation")
    return _to_admin()


@admin_actions.post("/phases")
def new_phase(
    session: SessionDep,
    competition: Annotated[str, Form()],
    name: Annotated[str, Form()],
    kind: Annotated[str, Form()],
) -> RedirectResponse:
    service.add_phase(session, service.get_competition(session, competition), name, kind)
    return _to_admin()


@admin_actions.post("/tasks")
@takes_upload
def new_task(
    session: SessionDep,
    settings: SettingsDep,
    competition: Annotated[str, Form()],
    phase: Annotated[str, Form()],
    name: Annotated[str, Form()],
    file: Annotated[UploadFile, File()],
) -> RedirectResponse:
    found = service.get_phase(service.get_competition(session, competition), phase)
    service.add_task(session, settings.data_dir, found, name, read_upload(file))
    return _to_admin()


@admin_actions.post("/calibration")
@takes_upload
def new_calibration(
    session: SessionDep,
    settings: SettingsDep,
    competition: Annotated[str, Form()],
    name: Annotated[str, Form()],
    file: Annotated[UploadFile, File()],
) -> RedirectResponse:
    found = service.get_competition(session, competition)
    service.add_calibration(session, settings.data_dir, found, name, read_upload(file))
    return _to_admin()


@admin_actions.post("/baselines")
@takes_upload
def new_baseline(
    session: SessionDep,
    settings: SettingsDep,
    competition: Annotated[str, Form()],
    phase: Annotated[str, Form()],
    name: Annotated[str, Form()],
    file: Annotated[UploadFile, File()],
) -> RedirectResponse:
    team = service.baseline_team(session)
    submit_upload(session, settings, team, file, competition, phase, name)
    return _to_admin()


@admin_actions.post("/finals")
def finals(session: SessionDep, competition: Annotated[str, Form()]) -> RedirectResponse:
    service.run_finals(session, service.get_competition(session, competition))
    return _to_admin()


@admin_actions.post("/phases/{phase_id}/close")
def close(phase_id: int, session: SessionDep) -> RedirectResponse:
    found = session.get(Phase, phase_id)
    if found is None:
        raise NotFoundError(f"no phase {phase_id}")
    service.close_phase(session, found)
    return _to_admin()


@admin_actions.post("/submissions/{submission_id}/{action}")
def organize(submission_id: int, action: str, session: SessionDep) -> RedirectResponse:
    service.organize(session, get_submission(session, submission_id), action)
    return _to_admin()


@admin_actions.post("/winners")
def winner(
    session: SessionDep,
    competition: Annotated[str, Form()],
    track: Annotated[str, Form()],
    submission_id: Annotated[int, Form()],
    place: Annotated[int, Form()] = 1,
    remove: Annotated[bool, Form()] = False,
) -> RedirectResponse:
    found = service.get_competition(session, competition)
    if remove:
        service.unmark_winner(session, found, track, submission_id)
    else:
        service.mark_winner(session, found, track, submission_id, place)
    return _to_admin()
