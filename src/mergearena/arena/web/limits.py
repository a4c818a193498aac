"""What a request can make the server read, and who may make it read an upload.

``BodyLimits``, a pure ASGI middleware, acts when a route first asks for its body (routing is
done by then, so it knows the route): a route marked ``takes_upload`` reads a body only for a
caller with a team's or the organizer's valid token (the ``Authorization`` header, else the
cookie the pages set), up to ``UPLOAD_BODY_BYTES``; every other route up to
``SMALL_BODY_BYTES``. A ``Content-Length`` over the cap is refused before one byte is read, and
a chunked body, or one longer than it said, is cut at the cap. So a request without credentials
is answered 401, and one too large 413, with nothing parsed or spooled to disk.

That is why the page form ``/submit`` has no token field (it would be inside the body): the
browser signs in first (``/team`` or ``/register`` set the cookie). The routes still check their
callers (a team's token on an organizer's upload route is refused after the body, within the
cap): the gate keeps outsiders out, it is not the authority.

FastAPI's own ``max_body_size`` is not used: its limiter answers a plain "Content Too Large" in
place of any response to a request declared over the cap, the 401 and the reason included.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mergearena.arena import service
from mergearena.arena.web.deps import (
    ORGANIZER_COOKIE,
    TEAM_COOKIE,
    bearer_token,
    get_settings,
    viewer,
)
from mergearena.errors import ArenaError, AuthError

SMALL_BODY_BYTES = 64 * 2**10  # a JSON object, or a form without a file
MULTIPART_OVERHEAD_BYTES = 64 * 2**10  # an upload's other form fields and its part headers
RETRY_AFTER_SECONDS = 5  # told to a client whose request the database was too busy for

Endpoint = TypeVar("Endpoint", bound=Callable[..., Any])


class BodyTooLargeError(ArenaError):
    """A request body over its route's cap (HTTP 413)."""


class DatabaseBusyError(ArenaError):
    """The database stayed locked by other writers past the lock timeout (HTTP 503)."""


def takes_upload(endpoint: Endpoint) -> Endpoint:
    """Mark a route that takes an uploaded file (put it below the router's decorator)."""
    endpoint.takes_upload = True  # type: ignore[attr-defined]
    return endpoint


def upload_body_bytes() -> int:
    """An upload route's cap: the largest file ``read_upload`` takes, and the form around it."""
    return service.MAX_UPLOAD_BYTES + MULTIPART_OVERHEAD_BYTES


def _declared_length(request: Request) -> int | None:
    try:
        return int(request.headers["content-length"])
    except (KeyError, ValueError):
        return None


def _too_large(upload: bool, cap: int, declared: int | None) -> BodyTooLargeError:
    size = f"is {declared:,} bytes" if declared is not None else "goes on past that"
    if not upload:
        return BodyTooLargeError(f"this request's body may be {cap:,} bytes at most; it {size}")
    return BodyTooLargeError(
        f"an upload may be {cap:,} bytes at most with its form; this one {size}. Submit a "
        "recipe or code, not model weights: models are named by reference"
    )


def _check_uploader(request: Request) -> None:
    """Raise ``AuthError`` unless the request carries a team's or the organizer's valid token
    (blocking: a team's token is looked up in the database)."""
    authorization = request.headers.get("authorization")
    with get_settings(request).sessions() as session:
        reader = viewer(request, session, authorization)
    if reader.organizer or reader.team is not None:
        return
    if bearer_token(authorization) or {TEAM_COOKIE, ORGANIZER_COOKIE} & set(request.cookies):
        raise AuthError("the token is not valid; check it, or rotate it from your team page")
    raise AuthError(
        "no API token given: an upload is read only from a team (its token as Authorization: "
        "Bearer, or a browser signed in on /team) or from the organizer"
    )


Refuse = Callable[[Request, Exception], Awaitable[Response]]


class BodyLimits:
    """The middleware. ``refuse`` renders an error (an ``ArenaError``, a database error) as the
    app's exception handlers do, for the answer given in the app's place."""

    def __init__(self, app: ASGIApp, refuse: Refuse) -> None:
        self.app, self.refuse = app, refuse

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        cap: int | None = None  # set when the route first asks for its body
        received = 0
        started = refused = False

        async def refuse(error: Exception) -> None:
            nonlocal refused
            if not started:  # else the client already has an answer, cut short
                response = await self.refuse(Request(scope), error)
                await response(scope, _nothing, send)
                refused = True
            raise _Refused from error

        async def limited_receive() -> Message:
            nonlocal cap, received
            if cap is None:
                request = Request(scope)
                upload = getattr(scope.get("endpoint"), "takes_upload", False)
                cap = upload_body_bytes() if upload else SMALL_BODY_BYTES
                try:
                    if upload:
                        await run_in_threadpool(_check_uploader, request)
                    declared = _declared_length(request)
                    if declared is not None and declared > cap:
                        raise _too_large(upload, cap, declared)
                except Exception as error:  # noqa: BLE001 - refuse renders it or re-raises
                    await refuse(error)
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > cap:
                    upload = cap > SMALL_BODY_BYTES
                    await refuse(_too_large(upload, cap, None))
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused:  # the app's own answer to the body it never got is dropped
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _Refused:
            pass


class _Refused(Exception):
    """Stops the app after the middleware answered for it."""


async def _nothing() -> Message:
    return {"type": "http.disconnect"}
