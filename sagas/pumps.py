"""Pump slots: under load, fewer doorbells than sagas.

A doorbell costs its worker about 2 ms of CPU before the engine does anything (the broker's
receive, ack and bookkeeping round trips, the pool's hand-over), which is as much as a whole
five-step saga's engine work. So a saga that is due now does not always get a message of its
own: a task that answers a doorbell with a *pump slot* (``saga_pump`` in its message headers)
runs its own saga, then keeps claiming the oldest due sagas straight from the database
(:func:`sagas.store.claim_due`) until its inline budget is spent. Whoever makes a saga due now
(a start, a hand-over) first asks for a slot: while every slot is taken, no message is sent,
because a pump will find the saga.

The slots live in Redis, one sorted set per queue and database (``SAGA_PUMPS`` of them, each
scored by when it expires). The one rule that keeps a saga from being forgotten: a pump gives
its slot back *before* it looks for due sagas one last time (:func:`sagas.runner.advance`). A
starter that found every slot taken did so after its saga committed, and before at least one
holder gave its slot back; that holder's last look sees the saga. A slot whose holder died
expires after a lease (and the sweeper rings for the saga as for any lost doorbell); the next
pump takes the oldest due sagas first, so it takes those too.

Without Redis (``SAGA_PUMP_REDIS_URL`` empty: a RabbitMQ broker with no Redis cache, the
file broker of ``make run``), with ``SAGA_PUMPS=0``, or while Redis does not answer, a start
or hand-over gets its own doorbell, as it always did; the sagas started before Redis stopped
answering get one more pump that holds no slot (see :func:`sagas.runner._last_look`), and the
sweeper sends one for sagas that waited (:func:`sagas.sweeper.sweep`).
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from typing import Any

import structlog
from django.conf import settings
from django.db import connection

from sagas.timing import lease_seconds

log = structlog.get_logger("sagas.engine")


class _Off:
    """No slot system here: ring as usual."""

    def __repr__(self) -> str:
        return "OFF"


#: :func:`acquire`'s answer when slots are off here (``SAGA_PUMPS=0``, no Redis configured).
OFF = _Off()


class _Down(_Off):
    """Slots are in use, but Redis is not answering now."""

    def __repr__(self) -> str:
        return "DOWN"


#: :func:`acquire`'s answer while Redis does not answer (slots on, none to be had now).
DOWN = _Down()

# Drop expired slots; take one if fewer than ARGV[1] are held. The time is Redis's own, so
# hosts with skewed clocks agree on what has expired.
_ACQUIRE = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
  redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[2]) * 1000))
  return 1
end
return 0
"""

# After Redis failed to answer, skip it for this long: rings go out one per saga meanwhile.
_DOWN_SECONDS = 2.0
_down_until = 0.0
_client: tuple[str, Any, Any] | None = None  # (url, client, acquire script)
# Slots whose release failed (Redis did not answer): given back with the next call that gets
# through, so a short Redis outage does not leave them held for a whole lease.
_unreleased: list[str] = []
_unreleased_lock = threading.Lock()  # the threads pool runs pumps side by side


def _after_fork() -> None:
    """A forked child starts with no slots of its parent to give back, and a free lock."""
    global _unreleased_lock, _down_until
    _unreleased.clear()
    _unreleased_lock = threading.Lock()
    _down_until = 0.0


os.register_at_fork(after_in_child=_after_fork)


def _script() -> Any | None:
    """The acquire script on a client for ``SAGA_PUMP_REDIS_URL`` (made once per process and
    URL; redis-py's pool opens its connections again in a forked child)."""
    global _client
    url = settings.SAGA_PUMP_REDIS_URL
    if not url:
        return None
    if _client is None or _client[0] != url:
        import redis

        client = redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
        _client = (url, client, client.register_script(_ACQUIRE))
    return _client[2]


def key() -> str:
    """The slots of this deployment's saga queue on this database: a pump only ever claims
    sagas of its own database, and only workers of its queue answer its doorbell."""
    return (
        f"{settings.CACHES['default'].get('KEY_PREFIX', '')}:saga-pumps:"
        f"{connection.settings_dict['NAME']}:{settings.CELERY_TASK_DEFAULT_QUEUE}"
    )


def enabled() -> bool:
    """Slots are in use: set, with Redis to keep them, and PostgreSQL to claim due sagas from."""
    return (
        settings.SAGA_PUMPS > 0
        and bool(settings.SAGA_PUMP_REDIS_URL)
        and connection.vendor == "postgresql"
    )


def acquire() -> str | None | _Off:
    """A new slot (``"<key> <token>"``, what a doorbell's header carries); ``None`` if every
    slot is taken (a pump will find the saga); :data:`OFF` if slots are off here, :data:`DOWN`
    if Redis does not answer (either way: ring as usual). Never raises."""
    global _down_until
    if not enabled():
        return OFF
    if time.monotonic() < _down_until:
        return DOWN
    slots, token = key(), uuid.uuid4().hex
    try:
        script = _script()
        if script is None:
            return OFF
        if _unreleased:
            _give_back(script.registered_client)
        got = script(keys=[slots], args=[settings.SAGA_PUMPS, lease_seconds(), token])
    except Exception as exc:  # noqa: BLE001 - no answer: every saga gets its own doorbell
        _down_until = time.monotonic() + _DOWN_SECONDS
        log.warning("saga.pump_slots_unavailable", error=repr(exc))
        return DOWN
    return f"{slots} {token}" if got == 1 else None


#: A pump doorbell that holds no slot (Redis not answering, the sweeper's backstop): its task
#: pumps like any other, and has nothing to give back.
NO_SLOT = ""


def release(slot: str) -> None:
    """Give a slot back, to the set it came from (a worker configured with another key prefix
    or database name still frees the sender's slot). Never raises: a slot Redis did not take
    back is tried again with this process's next call, and expires after a lease anyway."""
    if slot == NO_SLOT:
        return
    try:
        script = _script()
        if script is None:
            return  # no Redis configured here: nothing this process can free
        _give_back(script.registered_client, slot)
    except Exception as exc:  # noqa: BLE001 - kept for the next call
        global _down_until
        _down_until = time.monotonic() + _DOWN_SECONDS
        log.warning("saga.pump_release_failed", error=repr(exc))


def _give_back(client: Any, slot: str | None = None) -> None:
    """Remove ``slot`` and any slots whose release failed earlier, in one round trip; what
    fails stays listed. Each caller sends its own slot itself (the threads pool)."""
    with _unreleased_lock:
        slots = [*_unreleased, *([slot] if slot else [])]
        _unreleased.clear()
    if not slots:
        return
    try:
        with client.pipeline(transaction=False) as pipe:
            for one in slots:
                name, _, token = one.rpartition(" ")
                pipe.zrem(name, token)
            pipe.execute()
    except BaseException:
        with _unreleased_lock:
            _unreleased[:0] = slots
            del _unreleased[:-1000]  # bounded: older ones expire by themselves
        raise


def held() -> int | None:
    """How many slots are held now (expired ones not counted); ``None`` if it cannot say."""
    try:
        script = _script()
        if script is None:
            return None
        client = script.registered_client
        seconds, micros = client.time()
        return int(client.zcount(key(), f"({seconds + micros / 1e6}", "+inf"))
    except Exception:  # noqa: BLE001
        return None
