"""What the routes share: the settings, one database session per request, and who is asking (a
team by its API token, the organizer by the organizer token), as FastAPI dependencies.

Every token check goes through here, so each wrong token counts against its client's address
(``ratelimit.py``), whichever route it was tried on."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Header, Request, UploadFile
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from mergearena.arena import service
from mergearena.arena.db import Competition, Submission, Team
from mergearena.arena.web.ratelimit import FAILED_TOKEN_LIMIT, REGISTRATION_LIMIT, Limiter
from mergearena.errors import ArenaError, AuthError

TEAM_COOKIE = "mergearena_team"
ORGANIZER_COOKIE = "mergearena_organizer"


@dataclass
class ArenaSettings:
    sessions: sessionmaker
    data_dir: Path
    organizer_token: str | None = None  # None: no organizer actions over HTTP
    # Per client address, in a moving window ("10/hour", "20 per minute": ``ratelimit.py``).
    registration_limit: str = REGISTRATION_LIMIT
    failed_token_limit: str = FAILED_TOKEN_LIMIT


def get_settings(request: Request) -> ArenaSettings:
    return request.app.state.settings


def get_session(request: Request) -> Iterator[Session]:
    """One session per request, committed when the handler succeeds and before the response is
    sent (scope "function"): a client told "queued" can read its submission back at once, and a
    failed commit is an error response, never a success for a change that was lost."""
    with request.app.state.settings.sessions() as session:
        yield session
        session.commit()


SettingsDep = Annotated[ArenaSettings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
AuthorizationHeader = Annotated[str | None, Header(description="Bearer <token>")]


def bearer_token(authorization: str | None) -> str | None:
    if authorization and authorization.lower().startswith("bearer "):
        return authorization[7:].strip()
    return None


def client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _limiter(request: Request) -> Limiter:
    return request.app.state.limiter


def _organizer_token_matches(request: Request, token: str) -> bool:
    expected = get_settings(request).organizer_token
    if not expected:  # no organizer configured: no token is the organizer's
        return False
    return secrets.compare_digest(token.encode(), expected.encode())


def _team_or_none(session: Session, token: str) -> Team | None:
    try:
        return service.team_for_token(session, token)
    except AuthError:
        return None


def organizer_token_is(request: Request, token: str | None) -> bool:
    """Whether ``token`` is the organizer token; a wrong one counts as a failed attempt."""
    if not token:
        return False
    _limiter(request).refuse_if_guessing(client_address(request))
    if _organizer_token_matches(request, token):
        return True
    _limiter(request).count_failed_token(client_address(request))
    return False


def is_organizer(request: Request, authorization: str | None = None) -> bool:
    """Whether the request carries the organizer token (bearer, else the organizer cookie)."""
    given = bearer_token(authorization) or request.cookies.get(ORGANIZER_COOKIE)
    return organizer_token_is(request, given)


def require_organizer(request: Request, authorization: AuthorizationHeader = None) -> None:
    if not is_organizer(request, authorization):
        raise AuthError("this needs the organizer token the server was started with")


def authenticate_team(request: Request, session: Session, token: str | None) -> Team:
    """The team whose token this is; a wrong one counts against the client's address."""
    if not token:
        return service.team_for_token(session, token)  # says that none was given
    _limiter(request).refuse_if_guessing(client_address(request))
    try:
        return service.team_for_token(session, token)
    except AuthError:
        _limiter(request).count_failed_token(client_address(request))
        raise


def current_team(
    request: Request, session: SessionDep, authorization: AuthorizationHeader = None
) -> Team:
    """The team whose token the request carries (header, else the cookie the pages set)."""
    token = bearer_token(authorization) or request.cookies.get(TEAM_COOKIE)
    return authenticate_team(request, session, token)


def register_team(request: Request, session: Session, name: str) -> tuple[Team, str]:
    """Register a team for a client, counting the attempt against its address."""
    _limiter(request).count_registration(client_address(request))
    return service.register_team(session, name)


@dataclass(frozen=True)
class Viewer:
    """Who reads a route anyone may call that shows more to some: the organizer, a team, or
    anyone (neither set)."""

    organizer: bool = False
    team: Team | None = None


def viewer(request: Request, session: Session, authorization: str | None = None) -> Viewer:
    """Who is asking, by a bearer token or the pages' cookies. A token that is neither the
    organizer's nor a team's counts as a failed attempt (the answer would tell which it is)."""
    bearer = bearer_token(authorization)
    organizer_token = bearer or request.cookies.get(ORGANIZER_COOKIE)
    team_token = bearer or request.cookies.get(TEAM_COOKIE)
    if not (organizer_token or team_token):
        return Viewer()
    _limiter(request).refuse_if_guessing(client_address(request))
    if organizer_token and _organizer_token_matches(request, organizer_token):
        return Viewer(organizer=True)
    team = _team_or_none(session, team_token) if team_token else None
    if team is None:
        _limiter(request).count_failed_token(client_address(request))
    return Viewer(team=team)


def reads_privately(reader: Viewer, submission: Submission) -> bool:
    """Whether ``reader`` sees ``submission``'s private side: its file, log and final pick."""
    return reader.organizer or (reader.team is not None and reader.team.id == submission.team_id)


def may_read(reader: Viewer, submission: Submission) -> bool:
    """Whether ``reader`` may read ``submission`` at all: its team and the organizer always,
    anyone else once it is public (``service.is_public``)."""
    return reads_privately(reader, submission) or service.is_public(submission)


TeamDep = Annotated[Team, Depends(current_team)]
OrganizerOnly = [Depends(require_organizer)]


def read_upload(upload: UploadFile) -> bytes:
    """Read at most the upload limit (plus one byte, to tell that it was over). Blocking (the
    form is spooled to a file): upload routes are plain ``def``, run in the thread pool, so
    neither this nor their database work holds up the event loop."""
    limit = service.MAX_UPLOAD_BYTES
    data = upload.file.read(limit + 1)
    if len(data) > limit:
        raise service.SubmissionError(
            f"the upload is over {limit} bytes; submit a recipe or code, "
            "not model weights: models are named by reference"
        )
    return data


def only_competition(session: Session, slug: str | None) -> Competition:
    """The named competition, or the only one when none is named."""
    if slug:
        return service.get_competition(session, slug)
    competitions = session.scalars(select(Competition)).all()
    if len(competitions) != 1:
        names = ", ".join(c.slug for c in competitions) or "none"
        raise ArenaError(f"name the competition (there are several or none: {names})")
    return competitions[0]
