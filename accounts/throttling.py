"""API rate limits, counted where every web process and host sees the same count.

DRF's own throttles keep a list of timestamps per client and write it back whole: two processes
serving the same client at once both read the old list and one write is lost, so a client
spread over many processes gets more than its limit. These count in a fixed window with one
atomic step per request instead: the limit holds across processes, and a client gets at most
its limit per window (a burst at a window's end and the next's start can reach twice the rate
over a short span; that is the price of atomic counting). Where the count is kept:

* **Redis** (``CACHE_URL=redis://...``, the default with a Redis broker): one ``INCR`` of a key
  that expires with its window.
* **The database**, for any other cache (``db://``, the default with a RabbitMQ broker, and
  ``file://``, that of ``make run``): one ``INSERT ... ON CONFLICT DO UPDATE ... RETURNING``
  of a :class:`accounts.models.RateLimitCount` row per request, the same statement on
  PostgreSQL and on SQLite. Those caches' ``incr`` is a read then a write, so concurrent
  requests lost counts; it also wrote the count back with the cache's default timeout (5
  minutes), so an hourly or daily window started again every 5 minutes, and the database cache
  culls entries past its ``MAX_ENTRIES``, so counters vanished under many clients. A row stays
  until its window has ended; then the periodic ``accounts.purge_rate_limit_counts`` (beat,
  every 10 minutes) deletes it, one ``DELETE`` of a range of the unique index.

* :func:`charge_user`: ``API_RATE_LIMIT`` per user on every API route (and on a path under
  ``/api/`` no route matches, whose view runs the same classes), charged by the
  authentication classes (``accounts.tokens``) once a request has authenticated, because DRF
  checks permissions before throttles: as a throttle class it never saw a request refused with
  ``403``, so a user could send those without end.
* :class:`OrderRateThrottle`: ``API_RATE_LIMIT_ORDERS`` per user on ``POST /orders/``, charged
  by the view only for a request that may place an order (an idempotent replay is not).
* :func:`charge_anonymous`: ``API_RATE_LIMIT_ANON`` per client address (an IPv6 one by its
  /64, :func:`address_bucket`) for requests without valid credentials (anonymous ones and
  failed token attempts), charged by the authentication classes because DRF checks
  permissions (a ``401``) before throttles.

Above a limit: ``429`` ``{"code": "throttled", ...}`` with ``Retry-After`` (seconds to the end of
the window).

A Redis that does not answer (by default it is the broker's) lets requests through uncounted
for :data:`DOWN_SECONDS` at a time, with a warning each time (about one per process: threads
that were asking at that moment each log theirs): a rate limit guards the service, it must not
take the API down with Redis. An order placed while Redis is down still gets its ``201`` and
its saga runs once the broker is back, as the engine promises. A database that does not answer
is not let through: without it no request is served anyway (the token is looked up there).

The count is written in autocommit: throttles run before a view opens any transaction, so a
client's row is locked for one statement, never for the length of a request.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import math
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from django.conf import settings
from django.core.cache import caches
from django.core.cache.backends.redis import RedisCache
from django.db import connections, router
from django.utils import timezone
from redis.exceptions import AuthenticationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from rest_framework import exceptions, throttling
from rest_framework.request import Request

from accounts.models import COUNTER_MAX_LENGTH, RateLimitCount
from audit.context import client_ip
from config.db import column_of

log = structlog.get_logger(__name__)

#: How long requests go uncounted after Redis failed to answer, before it is asked again: a
#: Redis that is down costs one warning and one refused connection per process per span, not
#: one per request.
DOWN_SECONDS = 5.0
#: Until when (``time.monotonic()``) this process does not ask Redis.
_down_until = 0.0
#: What a Redis that does not answer raises (refused, timed out, reset, loading; an
#: ``OSError`` from its socket). Not a Redis that answers with an error (a wrong password,
#: read-only, out of memory): that is a configuration to mend, and stays a 500 rather than
#: limits silently off.
_UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, OSError)
#: How long a count is kept after its window ended before the purge deletes it: a web host
#: whose clock is a little behind may still be counting in that window.
PURGE_GRACE = timedelta(minutes=1)


class FixedWindowThrottle(throttling.SimpleRateThrottle):
    """A DRF throttle whose rate comes from a setting (read per request, so it can change
    without a restart of the class) and whose count is one atomic step: an ``INCR`` in Redis,
    else an upsert in the database."""

    #: The Django setting holding the rate, e.g. ``"1200/min"``; empty means no limit.
    rate_setting = ""
    cache_alias = "default"

    def __init__(self) -> None:  # SimpleRateThrottle reads THROTTLE_RATES here; we read later
        self.wait_seconds = 0.0

    def get_rate(self) -> str | None:
        return getattr(settings, self.rate_setting, None) or None

    def get_ident(self, request: Request) -> str:
        return address_bucket(client_ip(request))

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
        now = time.time()
        window = int(now // duration)
        cache = caches[self.cache_alias]
        if isinstance(cache, RedisCache):
            count = _count_in_redis(cache, f"throttle:{key}:{duration}:{window}", duration)
            if count is None:  # Redis did not answer: uncounted for a while
                return True
        else:
            # Any other cache's incr is a read and a write, with the cache's default timeout.
            count = count_in_database(f"{key}:{duration}", window_end=(window + 1) * duration)
        if count > num_requests:
            self.wait_seconds = (window + 1) * duration - now
            return False
        return True

    def wait(self) -> float:
        return max(1, math.ceil(self.wait_seconds))


class UserRateThrottle(FixedWindowThrottle):
    """``API_RATE_LIMIT`` per authenticated user, on every API route (charged by
    :func:`charge_user`, as the request authenticates as ``user``)."""

    scope = "user"
    rate_setting = "API_RATE_LIMIT"

    def __init__(self, user: Any) -> None:
        super().__init__()
        self.user = user

    def get_cache_key(self, request: Request, view) -> str | None:
        return f"user:{self.user.pk}"


class OrderRateThrottle(FixedWindowThrottle):
    """``API_RATE_LIMIT_ORDERS`` per user on ``POST /orders/`` (charged by the view)."""

    scope = "orders"
    rate_setting = "API_RATE_LIMIT_ORDERS"

    def get_cache_key(self, request: Request, view) -> str | None:
        return f"orders:{request.user.pk}"


class AnonymousRateThrottle(FixedWindowThrottle):
    """``API_RATE_LIMIT_ANON`` per client address (IPv6: per /64), for requests without valid
    credentials."""

    scope = "anon"
    rate_setting = "API_RATE_LIMIT_ANON"

    def get_cache_key(self, request: Request, view) -> str | None:
        return f"anon:{self.get_ident(request)}"


def address_bucket(address: str | None) -> str:
    """What a client's address is counted under: an IPv4 address as it is, an IPv6 address by
    its /64 (``2001:db8:1:2::/64``), an IPv4-mapped IPv6 address as the IPv4 one.

    A /64 is the smallest network an IPv6 host is given (one LAN, SLAAC): its holder picks any
    of its 2^64 addresses at will, so a limit per address would not limit it at all. Only the
    rate limits count this way; the audit log records the address itself.
    """
    if not address:
        return "unknown"
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:  # not an address (a forwarded header, misconfigured): as it came
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def check(throttle: FixedWindowThrottle, request: Request, view=None) -> None:
    """Charge ``throttle`` for this request; raise DRF's ``Throttled`` (a ``429``) above it."""
    if not throttle.allow_request(request, view):
        raise exceptions.Throttled(wait=throttle.wait())


def charge_user(request: Request, user: Any) -> None:
    """Charge ``user``'s ``API_RATE_LIMIT`` for this request, which has just authenticated as
    them (the authentication classes call it, before DRF reads ``request.user``)."""
    check(UserRateThrottle(user), request)


def charge_anonymous(request: Request) -> None:
    check(AnonymousRateThrottle(), request)


# ---------------------------------------------------------------------------------------------
# Where the count is kept
# ---------------------------------------------------------------------------------------------
def _count_in_redis(cache: RedisCache, counter: str, duration: int) -> int | None:
    """This request's number in the window: one atomic ``INCR`` (the first request of a window
    creates the key, expiring just after the window). ``None`` when Redis does not answer:
    then nothing is asked of it for :data:`DOWN_SECONDS`."""
    global _down_until
    if time.monotonic() < _down_until:
        return None
    try:
        if cache.add(counter, 1, timeout=duration + 1):
            return 1
        try:
            return cache.incr(counter)
        except ValueError:  # expired between add and incr: this request opens it again
            cache.add(counter, 1, timeout=duration + 1)
            return 1
    except _UNAVAILABLE as exc:
        if isinstance(exc, AuthenticationError):  # a ConnectionError, but an answer
            raise
        _down_until = time.monotonic() + DOWN_SECONDS
        log.warning(
            "api.rate_limit_unavailable",
            error=repr(exc),
            uncounted_for_seconds=DOWN_SECONDS,
        )
        return None


def count_in_database(counter: str, *, window_end: int) -> int:
    """Count one more request under ``counter`` in the window ending at ``window_end`` (Unix
    seconds) and return how many the window holds now, this one included.

    One statement, atomic on PostgreSQL and on SQLite (3.35 or later) alike: the first request
    of a window inserts its row, every later one adds one to it, whichever comes first, and
    each gets its own number. A counter that cannot be a row's (longer than the column, or
    holding what the database cannot store, as a client's forwarded address might) is counted
    under its digest.
    """
    if len(counter) > COUNTER_MAX_LENGTH or not counter.isprintable():
        digest = hashlib.sha256(counter.encode("utf-8", "backslashreplace")).hexdigest()
        counter = f"sha256:{digest}"
    using = router.db_for_write(RateLimitCount)
    connection = connections[using]
    ends = connection.ops.adapt_datetimefield_value(datetime.fromtimestamp(window_end, tz=UTC))
    with connection.cursor() as cursor:
        cursor.execute(_upsert_text(using), [counter, ends])
        [(hits,)] = cursor.fetchall()
    return hits


@functools.cache
def _upsert_text(using: str) -> str:
    quote = connections[using].ops.quote_name
    meta = RateLimitCount._meta
    table = quote(meta.db_table)
    counter, window_end, hits = (
        quote(column_of(meta.get_field(name))) for name in ("counter", "window_end", "hits")
    )
    return (
        f"INSERT INTO {table} ({counter}, {window_end}, {hits}) VALUES (%s, %s, 1) "
        f"ON CONFLICT ({window_end}, {counter}) DO UPDATE SET {hits} = {table}.{hits} + 1 "
        f"RETURNING {hits}"
    )


def purge_ended_windows(*, now: datetime | None = None) -> int:
    """Delete the database's counts whose window ended more than :data:`PURGE_GRACE` ago;
    return how many. One ``DELETE`` of a range of the unique index's first column; the rows of
    windows still open are not touched, so it waits for no request. Beat runs it every 10
    minutes (``accounts.purge_rate_limit_counts``)."""
    cutoff = (now or timezone.now()) - PURGE_GRACE
    deleted, _ = RateLimitCount.objects.filter(window_end__lt=cutoff).delete()
    return deleted
