"""Per-address limits on what a squatter or a guesser repeats: team registrations, and tokens
(a team's or the organizer's) that turn out wrong.

Counted with the ``limits`` package in a moving window, in this server process's memory: each
of several servers behind a load balancer counts on its own, and a restart forgets. The address
is the one the server sees (``request.client.host``): behind a reverse proxy, the proxy's,
unless uvicorn is told to trust its ``X-Forwarded-For`` (``FORWARDED_ALLOW_IPS``). Teams behind
one NAT share their address, so the defaults leave room for a classroom.

Past the failed-token limit no token from that address is checked at all, a right one
included, until the window frees a slot: a guess then learns nothing.
"""

from __future__ import annotations

import math
import time

from limits import RateLimitItem, parse
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter

from mergearena.errors import ArenaError

REGISTRATION_LIMIT = "10/hour"  # new teams per address
FAILED_TOKEN_LIMIT = "20/minute"  # wrong tokens per address


class TooManyRequests(ArenaError):
    """An address over one of the limits; ``retry_after``: seconds until a slot frees."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def _parse(setting: str, value: str) -> RateLimitItem:
    try:
        return parse(value)
    except ValueError:
        raise ArenaError(
            f"{setting} {value!r} is not a rate limit; write e.g. '10/hour' or '20 per minute'"
        ) from None


class Limiter:
    """The arena's two limits, counted per client address."""

    def __init__(self, registrations: str, failed_tokens: str) -> None:
        self.registrations = _parse("the registration limit", registrations)
        self.failed_tokens = _parse("the failed-token limit", failed_tokens)
        self._window = MovingWindowRateLimiter(MemoryStorage())

    def _seconds_until_free(self, limit: RateLimitItem, address: str) -> int:
        reset = self._window.get_window_stats(limit, address).reset_time
        return max(1, math.ceil(reset - time.time()))

    def count_registration(self, address: str) -> None:
        """Count a registration attempt (a refused name too) from ``address``; refuse it past
        the limit."""
        if not self._window.hit(self.registrations, address):
            wait = self._seconds_until_free(self.registrations, address)
            raise TooManyRequests(
                f"too many registrations from your address ({self.registrations} allowed); "
                f"try again in {wait} s, or ask the organizer if your teams share one address",
                wait,
            )

    def refuse_if_guessing(self, address: str) -> None:
        """Refuse to check any token from ``address`` while it is over the failed-token limit."""
        if not self._window.test(self.failed_tokens, address):
            wait = self._seconds_until_free(self.failed_tokens, address)
            raise TooManyRequests(
                f"too many wrong tokens from your address ({self.failed_tokens} allowed); no "
                f"token is checked for {wait} s: check yours (a rotated token replaces the old "
                "one), then try again",
                wait,
            )

    def count_failed_token(self, address: str) -> None:
        self._window.hit(self.failed_tokens, address)
