"""Refuse cross-site requests that change state: a page elsewhere must not make a signed-in
browser post to the arena (rotate a team's token, pick its final, act as the organizer), nor
sign a browser in to a team of its choosing (login CSRF on ``/register``, ``/team``, ``/admin``).

The cookies are ``SameSite=Strict``, but a browser that ignores SameSite would still send them,
so every POST, PUT, PATCH or DELETE must say where it comes from, and that must be the arena:

- a request with ``Authorization: Bearer`` passes: an API client, whose token is no ambient
  credential (a page elsewhere cannot set that header without a CORS preflight, which the arena
  never grants);
- else its ``Origin`` header, or when that is absent the origin of its ``Referer``, must equal
  the arena's own origin (scheme, host and port the request was sent to; ``Origin: null``, from
  a sandboxed frame or a redirect, never does);
- a request with neither header passes only if it carries none of the arena's cookies: a
  browser sends ``Origin`` with every cross-site POST, so a request with neither is a script or
  command-line client, which has no cookie a page elsewhere could borrow. One with the arena's
  cookie and neither header is refused: it is a browser that hides where the request came from.

The arena's origin is read from the request (its ``Host`` header and scheme). Behind a reverse
proxy, the proxy must pass the ``Host`` the browser used, and its scheme in
``X-Forwarded-Proto`` for uvicorn to honour (from the addresses ``FORWARDED_ALLOW_IPS`` trusts).
"""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.requests import Request

from mergearena.arena.web.deps import ORGANIZER_COOKIE, TEAM_COOKIE, bearer_token
from mergearena.errors import ArenaError

STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
DEFAULT_PORTS = {"http": 80, "https": 443}

Origin = tuple[str, str, int]  # scheme, host, port


class CrossSiteError(ArenaError):
    """A state-changing request from somewhere other than the arena's own pages (HTTP 403)."""


def origin_of(url: str) -> Origin | None:
    """The origin of an absolute http(s) URL, ports made explicit; None for anything else."""
    parts = urlsplit(url.strip())
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
        return None
    try:
        port = parts.port or DEFAULT_PORTS[parts.scheme]
    except ValueError:  # a port out of range, or not a number
        return None
    return parts.scheme, parts.hostname.lower(), port


def _shown(origin: Origin) -> str:
    scheme, host, port = origin
    return f"{scheme}://{host}" + ("" if DEFAULT_PORTS[scheme] == port else f":{port}")


def cross_site_refusal(request: Request) -> str | None:
    """Why ``request`` must be refused as cross-site (a message for the 403), or None."""
    if request.method not in STATE_CHANGING:
        return None
    if bearer_token(request.headers.get("authorization")):
        return None
    sent = request.headers.get("origin") or request.headers.get("referer")
    if sent is None:
        if not any(name in request.cookies for name in (TEAM_COOKIE, ORGANIZER_COOKIE)):
            return None
        return (
            f"refused: this {request.method} to {request.url.path} carries the arena's sign-in "
            "cookie but says neither where it comes from (no Origin or Referer header); send "
            "it from the arena's own pages in a browser that sends Origin, or from an API "
            "client with Authorization: Bearer <token>"
        )
    own = origin_of(str(request.base_url))
    assert own is not None  # the server's own URL is http(s)
    if origin_of(sent) == own:
        return None
    return (
        f"refused: this {request.method} to {request.url.path} comes from {sent!r}, not from "
        f"the arena's own pages ({_shown(own)}), and a page elsewhere may not act for a "
        "signed-in browser; use the arena's pages, or an API client with "
        "Authorization: Bearer <token>"
    )
