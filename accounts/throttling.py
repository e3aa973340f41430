"""API rate limits, counted in the shared cache (Redis) so every web process and host agrees.

DRF's own throttles keep a list of timestamps per client and write it back whole: two processes
serving the same client at once both read the old list and one write is lost, so a client
spread over many processes gets more than its limit. These count with one atomic ``INCR`` per
request in a fixed window instead: the limit holds across processes, and a client gets at
most its limit per window (a burst at a window's end and the next's start can reach twice the
rate over a short span; that is the price of atomic counting).

* :class:`UserRateThrottle`: ``API_RATE_LIMIT`` per user on every API route.
* :class:`OrderRateThrottle`: ``API_RATE_LIMIT_ORDERS`` per user on ``POST /orders/``, charged
  by the view only for a request that may place an order (an idempotent replay is not).
* :func:`charge_anonymous`: ``API_RATE_LIMIT_ANON`` per client address for requests without
  valid credentials (anonymous ones and failed token attempts), charged by the authentication
  classes because DRF checks permissions (a ``401``) before throttles.

Above a limit: ``429`` ``{"code": "throttled", ...}`` with ``Retry-After`` (seconds to the end of
the window).

A cache that does not answer (by default it is the broker's Redis) lets requests through
uncounted for :data:`DOWN_SECONDS` at a time, with a warning each time (about one per process:
threads that were asking at that moment each log theirs): a rate limit guards
the service, it must not take the API down with Redis. An order placed while Redis is down still
gets its ``201`` and its saga runs once the broker is back, as the engine promises.
"""

from __future__ import annotations

import math
import time

import structlog
from django.conf import settings
from django.core.cache import caches
from redis.exceptions import AuthenticationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from rest_framework import exceptions, throttling
from rest_framework.request import Request

from audit.context import client_ip

log = structlog.get_logger(__name__)

#: How long requests go uncounted after the cache failed to answer, before it is asked again: a
#: Redis that is down costs one warning and one refused connection per process per span, not
#: one per request.
DOWN_SECONDS = 5.0
#: Until when (``time.monotonic()``) this process does not ask the cache.
_down_until = 0.0
#: What a cache that does not answer raises: Redis (refused, timed out, reset, loading), the
#: file cache. Not a Redis that answers with an error (a wrong password, read-only, out of
#: memory): that is a configuration to mend, and stays a 500 rather than limits silently off.
#: The database cache is left out: without the database no request is served anyway.
_UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, OSError)


class FixedWindowThrottle(throttling.SimpleRateThrottle):
    """A DRF throttle whose rate comes from a setting (read per request, so it can change
    without a restart of the class) and whose count is one atomic cache increment."""

    #: The Django setting holding the rate, e.g. ``"1200/min"``; empty means no limit.
    rate_setting = ""
    cache_alias = "default"

    def __init__(self) -> None:  # SimpleRateThrottle reads THROTTLE_RATES here; we read later
        self.wait_seconds = 0.0

    def get_rate(self) -> str | None:
        return getattr(settings, self.rate_setting, None) or None

    def get_ident(self, request: Request) -> str:
        return client_ip(request) or "unknown"

    def allow_request(self, request: Request, view) -> bool:
        rate = self.get_rate()
        if rate is None:
            return True
        key = self.get_cache_key(request, view)
        if key is None:
            return True
        num_requests, duration = self.parse_rate(rate)
        if num_requests is None or duration is None:  # parse_rate's answer to no rate at all
            return True
        return self.hit(key, num_requests, duration)

    def hit(self, key: str, num_requests: int, duration: int) -> bool:
        global _down_until
        if time.monotonic() < _down_until:
            return True
        now = time.time()
        window = int(now // duration)
        try:
            count = self._count(f"throttle:{key}:{duration}:{window}", duration)
        except _UNAVAILABLE as exc:
            if isinstance(exc, AuthenticationError):  # a ConnectionError, but an answer
                raise
            _down_until = time.monotonic() + DOWN_SECONDS
            log.warning(
                "api.rate_limit_unavailable",
                error=repr(exc),
                uncounted_for_seconds=DOWN_SECONDS,
            )
            return True
        if count > num_requests:
            self.wait_seconds = (window + 1) * duration - now
            return False
        return True

    def _count(self, counter: str, duration: int) -> int:
        """This request's number in the window: one atomic step in the cache."""
        cache = caches[self.cache_alias]
        if cache.add(counter, 1, timeout=duration + 1):
            return 1
        try:
            return cache.incr(counter)
        except ValueError:  # expired between add and incr: this request opens it again
            cache.add(counter, 1, timeout=duration + 1)
            return 1

    def wait(self) -> float:
        return max(1, math.ceil(self.wait_seconds))


class UserRateThrottle(FixedWindowThrottle):
    """``API_RATE_LIMIT`` per authenticated user, on every API route."""

    scope = "user"
    rate_setting = "API_RATE_LIMIT"

    def get_cache_key(self, request: Request, view) -> str | None:
        user = getattr(request, "user", None)
        if user is None or not user.is_authenticated:
            return None  # anonymous requests are charged by charge_anonymous()
        return f"user:{user.pk}"


class OrderRateThrottle(FixedWindowThrottle):
    """``API_RATE_LIMIT_ORDERS`` per user on ``POST /orders/`` (charged by the view)."""

    scope = "orders"
    rate_setting = "API_RATE_LIMIT_ORDERS"

    def get_cache_key(self, request: Request, view) -> str | None:
        return f"orders:{request.user.pk}"


class AnonymousRateThrottle(FixedWindowThrottle):
    """``API_RATE_LIMIT_ANON`` per client address, for requests without valid credentials."""

    scope = "anon"
    rate_setting = "API_RATE_LIMIT_ANON"

    def get_cache_key(self, request: Request, view) -> str | None:
        return f"anon:{self.get_ident(request)}"


def check(throttle: FixedWindowThrottle, request: Request, view=None) -> None:
    """Charge ``throttle`` for this request; raise DRF's ``Throttled`` (a ``429``) above it."""
    if not throttle.allow_request(request, view):
        raise exceptions.Throttled(wait=throttle.wait())


def charge_anonymous(request: Request) -> None:
    check(AnonymousRateThrottle(), request)
