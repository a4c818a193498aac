"""The arena's web app: a JSON API under ``/api`` (OpenAPI docs at ``/docs``, every response a
pydantic model) and server-rendered pages (leaderboards, a submission form, team and organizer
pages) that call the same service code.

Teams authenticate with their API token (``Authorization: Bearer``, or a form field that sets an
HTTP-only cookie); the organizer with the organizer token the server was started with. Routes
are grouped by who may call them (``api.py``, ``pages.py``); ``deps.py`` holds what they share.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from mergearena.arena.web import api, pages
from mergearena.arena.web.deps import ArenaSettings
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
    if isinstance(error, LimitError):
        return 429
    return 400


async def _arena_error(request: Request, error: MergeArenaError) -> Any:
    """A bad task file or recipe too, not only ours: JSON under /api, an error page elsewhere."""
    status = _status(error)
    if request.url.path.startswith("/api/"):
        return JSONResponse({"detail": str(error)}, status_code=status)
    return pages.page(request, "error.html", status, message=str(error))


def create_app(settings: ArenaSettings) -> FastAPI:
    app = FastAPI(
        title="mergearena",
        description="The LLM merging competition service: submissions, queue, leaderboards.",
    )
    app.state.settings = settings
    app.add_exception_handler(MergeArenaError, _arena_error)

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
