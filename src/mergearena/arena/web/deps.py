"""What the routes share: the settings, one database session per request, and who is asking (a
team by its API token, the organizer by the organizer token), as FastAPI dependencies."""

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
from mergearena.arena.db import Competition, Team
from mergearena.errors import ArenaError, AuthError

TEAM_COOKIE = "mergearena_team"
ORGANIZER_COOKIE = "mergearena_organizer"


@dataclass
class ArenaSettings:
    sessions: sessionmaker
    data_dir: Path
    organizer_token: str | None = None  # None: no organizer actions over HTTP


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


def _bearer(authorization: str | None) -> str | None:
    if authorization and authorization.lower().startswith("bearer "):
        return authorization[7:].strip()
    return None


def is_organizer(request: Request, authorization: str | None = None) -> bool:
    given = _bearer(authorization) or request.cookies.get(ORGANIZER_COOKIE) or ""
    expected = get_settings(request).organizer_token
    return bool(expected) and secrets.compare_digest(given.encode(), expected.encode())


def require_organizer(request: Request, authorization: AuthorizationHeader = None) -> None:
    if not is_organizer(request, authorization):
        raise AuthError("this needs the organizer token the server was started with")


def current_team(
    request: Request, session: SessionDep, authorization: AuthorizationHeader = None
) -> Team:
    """The team whose token the request carries (header, else the cookie the pages set)."""
    return service.team_for_token(
        session, _bearer(authorization) or request.cookies.get(TEAM_COOKIE)
    )


TeamDep = Annotated[Team, Depends(current_team)]
OrganizerOnly = [Depends(require_organizer)]


async def read_upload(upload: UploadFile) -> bytes:
    """Read at most the upload limit (plus one byte, to tell that it was over)."""
    limit = service.MAX_UPLOAD_BYTES
    data = await upload.read(limit + 1)
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
