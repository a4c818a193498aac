"""The arena's web app: a JSON API under ``/api`` (OpenAPI docs at ``/docs``, every response a
pydantic model) and server-rendered pages (leaderboards, a submission form, team and organizer
pages) that call the same service code.

Teams authenticate with their API token (``Authorization: Bearer``, or a form field that sets an
HTTP-only cookie); the organizer with the organizer token the server was started with. Routes
are grouped by who may call them (``api.py``, ``pages.py``); ``deps.py`` holds what they share.
A state-changing request without a bearer token must come from the arena's own pages
(``origin.py``); wrong tokens and registrations are limited per address (``ratelimit.py``).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy.exc import OperationalError

from mergearena.arena.db import is_lock_timeout
from mergearena.arena.web import api, pages
from mergearena.arena.web.deps import ArenaSettings
from mergearena.arena.web.limits import (
    RETRY_AFTER_SECONDS,
    BodyLimits,
    BodyTooLargeError,
    DatabaseBusyError,
)
from mergearena.arena.web.origin import CrossSiteError, cross_site_refusal
from mergearena.arena.web.ratelimit import Limiter, TooManyRequests
from mergearena.errors import AuthError, LimitError, MergeArenaError, NotFoundError

__all__ = ["ArenaSettings", "create_app"]

# Every page and answer forbids scripts, plugins, frames and outside resources: whatever a team's
# name, log or write-up holds, nothing in it runs. Only the API docs (Swagger UI) need scripts.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
_NEEDS_SCRIPTS = ("/docs", "/redoc")


def _status(error: MergeArenaError) -> int:
    if isinstance(error, AuthError):
        return 401
    if isinstance(error, NotFoundError):
        return 404
    if isinstance(error, LimitError | TooManyRequests):
        return 429
    if isinstance(error, CrossSiteError):
        return 403
    if isinstance(error, BodyTooLargeError):
        return 413
    if isinstance(error, DatabaseBusyError):
        return 503
    return 400


async def _arena_error(request: Request, error: MergeArenaError) -> Response:
    """A bad task file or recipe too, not only ours: JSON under /api, an error page elsewhere."""
    status = _status(error)
    if request.url.path.startswith("/api/"):
        response: Response = JSONResponse({"detail": str(error)}, status_code=status)
    else:
        response = pages.page(request, "error.html", status, message=str(error))
    if status == 503:
        response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
    if isinstance(error, TooManyRequests):
        response.headers["Retry-After"] = str(error.retry_after)
    return response


async def _database_error(request: Request, error: OperationalError) -> Response:
    """A database too busy to take the request in time: 503 with Retry-After, not a 500 (any
    other database failure stays a server error)."""
    if not is_lock_timeout(error):
        raise error
    busy = DatabaseBusyError(
        f"the database is busy with other writes; nothing was changed. Try again in "
        f"{RETRY_AFTER_SECONDS} s"
    )
    return await _arena_error(request, busy)


async def _known_error(request: Request, error: Exception) -> Response:
    """The answer to an arena error or a busy database, from the app's exception handlers and
    from ``BodyLimits`` in the app's place. (One handler taking ``Exception`` for both: Starlette
    types a handler as taking any exception, so one for a narrower type does not check.)"""
    if isinstance(error, OperationalError):
        return await _database_error(request, error)
    if isinstance(error, MergeArenaError):
        return await _arena_error(request, error)
    raise error


def create_app(settings: ArenaSettings) -> FastAPI:
    app = FastAPI(
        title="mergearena",
        description="The LLM merging competition service: submissions, queue, leaderboards.",
    )
    app.state.settings = settings
    app.state.limiter = Limiter(settings.registration_limit, settings.failed_token_limit)
    app.add_exception_handler(MergeArenaError, _known_error)
    app.add_exception_handler(OperationalError, _known_error)
    app.add_middleware(BodyLimits, refuse=_known_error)  # inside no_scripts: its answers get CSP

    @app.middleware("http")
    async def same_origin(request: Request, call_next: Any) -> Any:
        """Outside ``BodyLimits``: a cross-site request is refused before a token is checked."""
        refusal = cross_site_refusal(request)
        if refusal is not None:
            return await _arena_error(request, CrossSiteError(refusal))
        return await call_next(request)

    @app.middleware("http")
    async def no_scripts(request: Request, call_next: Any) -> Any:
        response = await call_next(request)
        if not request.url.path.startswith(_NEEDS_SCRIPTS):
            response.headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
            response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    routers = (api.public, api.team, api.organizer, pages.pages, pages.admin, pages.admin_actions)
    for router in routers:
        app.include_router(router)
    return app
