"""One circuit breaker and one set of call limits per provider, shared by every worker.

The engine asks :func:`admit` before it calls a step's provider and hands the answer back to
:func:`report` with the outcome. ``admit`` answers with a :class:`Ticket` (go ahead) or a
:class:`Wait` (do not call; come back after ``delay``). The state lives in PostgreSQL rows
(see ``providers.models``), each change one conditional ``UPDATE``, so two workers racing for
the last canary or the last call slot cannot both win, and no process memory matters.

Breaker: ``closed`` until the failure rate of the calls in the last ``window`` seconds (and
admitted since the breaker last closed) reaches ``failure_rate`` over at least ``min_calls`` calls,
or ``min_calls`` of them fail within two seconds or in a row (:func:`_maybe_open`);
then ``open`` for ``cooldown`` seconds; then ``half_open``, letting ``canaries`` calls through,
judged by ``failure_rate`` too: enough of them succeeding closes it, that share failing opens
it again (:func:`canary_verdicts`). A canary's verdict counts only in the round that let it
through: one answering after its round ended (the breaker re-opened, or its lease passed and
a new round began) is still counted among the provider's calls, but moves no round. Only
transient failures count: a participant's business "no" is a healthy answer.
"""

from __future__ import annotations

import contextlib
import functools
import math
import random
from collections.abc import Callable, Iterable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from django.conf import settings
from django.db import DatabaseError, IntegrityError, connection, transaction
from django.db.models import F, QuerySet, Sum
from django.dispatch import Signal
from django.http import HttpRequest
from django.utils import timezone

from config.db import NO_FLUSH_WAIT
from providers import metrics
from providers.config import ProviderConfig, provider_config
from providers.models import Breaker, BreakerState, CallSlot, HealthBucket

log = structlog.get_logger("providers.breaker")

# While the slots or the rate are exhausted, a saga comes back after this much (jittered).
_LIMIT_WAIT = (0.1, 0.5)
_known_breakers: set[str] = set()
_known_slots: dict[str, int] = {}


@dataclass(frozen=True)
class Ticket:
    """Permission for one call; hand it back to :func:`report`."""

    provider: str
    generation: int = 0
    slot_id: int | None = None
    slot_lease: datetime | None = None
    canary: bool = False
    #: A canary's half-open round (``Breaker.canary_round`` when it was let through).
    canary_round: int = 0


#: Sent once a provider's breaker has closed (after the commit that closed it), with
#: ``provider``: whatever parked work on the provider may bring it back now instead of at its
#: next re-check (see :func:`recheck_after`). Receivers' errors are logged, not raised.
breaker_closed = Signal()


@dataclass(frozen=True)
class Wait:
    """Do not call now: the provider's breaker is open, or its limits are reached."""

    provider: str
    delay: float
    reason: str
    #: For a failed last attempt held back on a closed breaker (``failing``): the generation
    #: of the call's admission, which the saga remembers with ``holds``, its holds on the
    #: closed breaker in that generation, this one included (:func:`held_back` bounds them).
    generation: int | None = None
    holds: int = 0


#: Wait reasons that are a moment's queueing (a call slot, the rate limit), not an outage.
MOMENTARY = frozenset({"in_flight", "rate"})


def _call_lease(timeout: float | None = None) -> timedelta:
    """A call slot or canary is presumed lost this long after it was taken (killed worker).

    ``timeout``: the calling step's own (``SAGA_STEP_TIMEOUT`` if not given). A step is cut off
    at its timeout + ``SAGA_INLINE_BUDGET``, and its task killed 3 s later, so the slot outlives
    any call still running; sized from the default instead, a carrier booking of twice that
    could outlive its slot, and a second call take it while the first still runs.
    """
    seconds = settings.SAGA_STEP_TIMEOUT if timeout is None else timeout
    return timedelta(seconds=seconds + settings.SAGA_INLINE_BUDGET + 5.0)


@functools.cache
def _qn(name: str) -> str:
    """A quoted identifier, worked out once per name: the gate's statements are built on every
    provider call, from a few dozen names."""
    return connection.ops.quote_name(name)


def ensure_breaker(provider: str) -> None:
    if provider in _known_breakers:
        return
    with contextlib.suppress(IntegrityError):  # another worker created it first
        Breaker.objects.get_or_create(provider=provider, defaults={"since": timezone.now()})
    _known_breakers.add(provider)


def _ensure_slots(provider: str, count: int) -> None:
    if _known_slots.get(provider, -1) >= count:
        return
    CallSlot.objects.bulk_create(
        [CallSlot(provider=provider, n=n) for n in range(count)], ignore_conflicts=True
    )
    _known_slots[provider] = count


# ---------------------------------------------------------------------------------------------
# Admission
# ---------------------------------------------------------------------------------------------
def admit(provider: str, timeout: float | None = None) -> Ticket | Wait:
    """May a step call ``provider`` now? A :class:`Ticket` means yes (and holds a call slot).

    ``timeout``: the step's own, which sizes the slot's and a canary's lease.
    """
    cfg = provider_config(provider)
    held_for = _call_lease(timeout)
    ensure_breaker(provider)
    now = timezone.now()
    slot_id: int | None = None
    lease: datetime | None = None
    row: tuple[Any, ...] | None
    ahead = _take_ahead(provider, timeout)
    if ahead is not None:
        row, lease = ahead.row, ahead.lease
        slot_id = row[4]
    elif _one_statement_gate():
        lease_at = now + held_for
        deferred = _DEFERRED.get()
        try:
            row = _admit_closed(provider, cfg, now, lease_at, deferred)
        except DatabaseError:
            if deferred is None:
                raise
            # What the carried outcome writes may wait on rows another statement holds (a
            # slot whose lease ran out, taken again; the shared health row), which could end
            # in a deadlock, or fail: bookkeeping must not fail the call. Asked again without
            # it, left for report_deferred().
            row = _admit_closed(provider, cfg, now, lease_at)
        if row is not None:
            slot_id = row[4]
            lease = lease_at if slot_id is not None else None
    else:
        row = (
            Breaker.objects.filter(provider=provider)
            .values_list("state", "probe_at", "forced", "generation")
            .first()
        )
    if row is None:  # deleted under this process (a flushed test database): recreate it
        _known_breakers.discard(provider)
        ensure_breaker(provider)
        return admit(provider, timeout)
    state, probe_at, forced, generation = row[:4]
    canary_round = None
    if state != BreakerState.CLOSED:
        canary_round = None if forced else _take_canary(provider, cfg, now, held_for)
        if canary_round is None:
            metrics.PARKED.labels(provider, state).inc()
            return _wait(provider, cfg, state, probe_at, forced, now)
    if cfg.max_in_flight and slot_id is None:  # not already taken with the breaker's row
        slot_id, lease = _take_slot(provider, cfg, now, held_for)
        if slot_id is None:
            if canary_round is not None:
                _return_canary(provider, canary_round)
            metrics.LIMITED.labels(provider, "in_flight").inc()
            return Wait(provider, random.uniform(*_LIMIT_WAIT), "in_flight")
    if cfg.rate and not _take_rate(provider, generation, cfg, now):
        if slot_id is not None:
            _release_slot(slot_id, lease)
        if canary_round is not None:
            _return_canary(provider, canary_round)
        metrics.LIMITED.labels(provider, "rate").inc()
        return Wait(provider, random.uniform(*_LIMIT_WAIT), "rate")
    canary = canary_round is not None
    return Ticket(provider, generation, slot_id, lease, canary, canary_round or 0)


@dataclass(frozen=True)
class _Admitted:
    """An admission made ahead (:func:`admission_ahead`), waiting for its step's :func:`admit`."""

    provider: str
    timeout: float | None
    row: tuple[str, datetime | None, bool, int, int | None]
    lease: datetime | None


#: The admission the saga's last record made for the step this task goes straight on into.
_AHEAD: ContextVar[_Admitted | None] = ContextVar("provider_admission_ahead", default=None)


@dataclass(frozen=True)
class AdmissionAhead:
    """An admission as SQL another statement carries: its CTEs and parameters, the columns it
    answers with, and ``took``, to be called with those columns' values once it ran."""

    ctes: str
    params: list[Any]
    columns: tuple[str, ...]
    took: Callable[[Sequence[Any]], None]


def admission_ahead(provider: str, timeout: float | None, guard: str) -> AdmissionAhead | None:
    """The admission of a call the task is about to make, for the statement before it to carry.

    A saga's record that hands the saga straight on to its next step in the same task carries
    that step's admission: the breaker's row read and, when it is closed, a call slot taken in
    the record's own statement (only if ``guard``, the record's "it landed", holds), instead of
    a statement of the admission's own a moment later. The step's :func:`admit` then decides
    from that row as it would from its own; a canary, the rate limit, a full set of slots still
    go their usual way there. Carried inside a step's transaction, the slot is taken in it and
    the admission stands only once that commits (a rolled-back one took nothing). An admission
    no :func:`admit` uses (the task stopped, the saga went elsewhere) gives its slot back in
    :func:`drop_ahead`, or when its lease passes. PostgreSQL only.
    """
    if connection.vendor != "postgresql":
        return None
    cfg = provider_config(provider)
    ensure_breaker(provider)
    now = timezone.now()
    lease = now + _call_lease(timeout)
    ctes, params, columns = _gate_parts(provider, cfg, now, lease, prefix="g", guard=guard)

    def took(values: Sequence[Any]) -> None:
        row = _gate_row(values)
        if row is None:
            return
        admitted = _Admitted(provider, timeout, row, lease if row[4] is not None else None)
        transaction.on_commit(lambda: _AHEAD.set(admitted))

    return AdmissionAhead(ctes, params, columns, took)


def _take_ahead(provider: str, timeout: float | None) -> _Admitted | None:
    """The admission made ahead for this call, if there is one; another one is dropped."""
    admitted = _AHEAD.get()
    if admitted is None:
        return None
    if admitted.provider == provider and admitted.timeout == timeout:
        _AHEAD.set(None)
        return admitted
    drop_ahead()
    return None


def drop_ahead() -> None:
    """Give back the call slot of an admission made ahead that no call used.

    Never raises (called as a task ends, maybe failing): a slot not given back here comes back
    when its lease passes.
    """
    admitted = _AHEAD.get()
    if admitted is None:
        return
    _AHEAD.set(None)
    if admitted.row[4] is None:
        return
    try:
        _release_slot(admitted.row[4], admitted.lease)
    except Exception as exc:  # noqa: BLE001 - bookkeeping; the lease frees it anyway
        log.warning("provider.release_failed", provider=admitted.provider, error=repr(exc))


def _one_statement_gate() -> bool:
    """Whether admission and outcomes may each be one statement that does not wait for its
    commit's flush to disk.

    PostgreSQL only, and never inside a transaction: ``synchronous_commit`` is set for the
    current transaction, so inside a step's own transaction it would loosen the step's commit
    too. Losing the last moments of slot leases or health counts to a server crash is harmless
    (a lease runs out by itself; the counts are statistics), so these need no flush wait.
    """
    return connection.vendor == "postgresql" and not connection.in_atomic_block


def _admit_closed(
    provider: str,
    cfg: ProviderConfig,
    now: datetime,
    lease: datetime,
    deferred: CarriedOutcome | None = None,
) -> tuple[str, datetime | None, bool, int, int | None] | None:
    """The breaker's row and, when it is closed and calls are limited, a call slot taken in the
    same statement: one round trip for the common case instead of two. ``None`` when the
    breaker row is missing; a ``None`` slot when the breaker is not closed, calls are not
    limited, or no slot was free (the caller then takes the slow path).

    ``deferred``: an earlier call's outcome waiting for a statement to ride in (see
    :func:`defer_outcome`); it takes effect with this one, whatever this one answers.
    """
    ctes, params, columns = _gate_parts(provider, cfg, now, lease)
    carried, carried_params = (f", {deferred.ctes}", deferred.params) if deferred else ("", [])
    sql = f"WITH {NO_FLUSH_WAIT}, {ctes}{carried} SELECT {', '.join(columns)} FROM nf"
    with connection.cursor() as cursor:
        cursor.execute(sql, [*params, *carried_params])
        row = cursor.fetchone()
    if deferred is not None:
        _DEFERRED.set(None)
        deferred.carried()
    return _gate_row(row)


def _gate_row(row: Any) -> tuple[str, datetime | None, bool, int, int | None] | None:
    """The five gate columns as a tuple, or ``None`` when the breaker's row is missing."""
    if row is None or row[0] is None:
        return None
    return (row[0], row[1], row[2], row[3], row[4])


def _gate_parts(
    provider: str,
    cfg: ProviderConfig,
    now: datetime,
    lease: datetime,
    *,
    prefix: str = "",
    guard: str = "",
) -> tuple[str, list[Any], tuple[str, ...]]:
    """The admission's CTEs, their parameters and the five columns it answers with (the
    breaker's state, probe time, forced flag and generation, and the slot taken or NULL).

    ``prefix`` names the CTEs apart from those of a statement that carries them; ``guard``, a
    condition on that statement's own CTEs, must hold for a slot to be taken.
    """
    limited = bool(cfg.max_in_flight)
    ctes, columns = _gate_sql(prefix, guard, limited)
    params: list[Any] = [provider]
    if limited:
        _ensure_slots(provider, cfg.max_in_flight)
        ts = connection.ops.adapt_datetimefield_value
        params += [ts(lease), provider, cfg.max_in_flight, ts(now)]
    return ctes, params, columns


@functools.cache
def _gate_sql(prefix: str, guard: str, limited: bool) -> tuple[str, tuple[str, ...]]:
    """The text of :func:`_gate_parts`, built once per shape: it runs for every provider call."""
    b, t = _qn(Breaker._meta.db_table), _qn(CallSlot._meta.db_table)
    names = ("state", "probe_at", "forced", "generation")
    br, sl = f"{prefix}br", f"{prefix}s"
    cols = ", ".join(_qn(c) for c in names)
    ctes = f"{br} AS (SELECT {cols} FROM {b} WHERE {_qn('provider')} = %s)"
    slot_col = "NULL::integer"
    if limited:
        also = f" AND {guard}" if guard else ""
        ctes += (
            f", {sl} AS (UPDATE {t} SET {_qn('lease_until')} = %s WHERE {_qn('id')} = ("
            f"SELECT {_qn('id')} FROM {t} WHERE {_qn('provider')} = %s AND {_qn('n')} < %s AND "
            f"({_qn('lease_until')} IS NULL OR {_qn('lease_until')} <= %s) AND EXISTS ("
            f"SELECT 1 FROM {br} WHERE {_qn('state')} = 'closed'){also} LIMIT 1 "
            f"FOR UPDATE SKIP LOCKED) RETURNING {_qn('id')})"
        )
        slot_col = f"(SELECT {_qn('id')} FROM {sl})"
    return ctes, (*(f"(SELECT {_qn(c)} FROM {br})" for c in names), slot_col)


def _wait(
    provider: str,
    cfg: ProviderConfig,
    state: str,
    probe_at: datetime | None,
    forced: bool,
    now: datetime,
) -> Wait:
    """How long a saga parked on a breaker that is not closed waits before it looks again."""
    if forced or probe_at is None:
        due = now + _cooldown(cfg)
    elif state == BreakerState.HALF_OPEN:
        # Canaries answer in a call's time, not by their lease (probe_at): look again within
        # a cool-down rather than wait for the lease of a lost canary.
        due = min(probe_at, now + _cooldown(cfg))
    else:
        due = probe_at
    delay = max((due - now).total_seconds(), 0.0)
    # Spread the retries so that a provider coming back gets waves, not a wall.
    return Wait(provider, delay + random.uniform(0.05, max(cfg.release_spread, 0.05)), state)


def held_back(
    provider: str,
    *,
    generation: int | None = None,
    attempts: int = 1,
    previous: Callable[[], datetime | None] | None = None,
    kept_before: Callable[[int], int] | None = None,
) -> Wait | None:
    """A :class:`Wait` if the provider is failing now, else ``None``.

    Asked after a saga's last attempt failed: if the breaker opened meanwhile (maybe on this
    very failure), the failures were the outage's, and the saga waits for the provider instead
    of compensating or escalating.

    ``generation`` (the failed call's ticket's; given for a last attempt, not for a canary):
    with it, a breaker still closed in that generation holds the saga back too, for a
    cool-down and one more try, if the provider is failing though the breaker has not yet
    seen enough of it to open (it needs ``min_calls`` failures in its last
    :data:`RECENT_SECONDS` seconds or in a row, or half a window of them among the earlier
    successes: :func:`_maybe_open`):

    - **It has answered nobody since the call before this one** (its latest failures in a row,
      this one included, are two or more). Held back while that lasts: each try that fails
      again lengthens the row, until it opens the breaker (and the saga parks on it) or a
      call answered meanwhile shows the provider up. A lone caller's tries come a cool-down
      apart, and the window may never hold ``min_calls`` of them at once; so the saga's
      ``min_calls``-th hold in the generation, still with nobody answered, opens the breaker
      itself. A saga whose earlier attempts went on ordinary faults, among others'
      successes, and only its last few on an outage that nobody else met, was cancelled for
      it with the breaker one or two failures short of opening (a chaos run, with a worker
      killed during the outage). A quiet provider's only caller failing on its own request
      looks the same from here: held back the same way until its failures open the breaker,
      it is then its own canary until its deadline, or until another saga's call goes
      through and it gives up.
    - **Its most recent calls are failing for others too** (:func:`failing_now`; ``attempts``
      and ``previous``, the saga's failed attempts at the step and when the one before this
      ended, tell its own failures apart), though some were answered between: once in the
      generation, so a provider failing below its breaker's threshold does not keep a saga
      calling it.

    Without these, a saga whose attempts straddled the start of an outage (some spent on
    ordinary faults before it, the last on it) was cancelled a moment before the breaker
    opened. A breaker that opened and closed again while the call ran (a new generation: the
    call overlapped an outage, or a person closed it meanwhile) holds it back too, within the
    same bound (the count is the call's generation's).
    ``kept_before(generation)``: how many times the saga's failed last attempt was held back
    on a closed breaker in that generation already. Asked only when it matters (it costs the
    caller a read). An open breaker always holds the saga back.
    """
    row = (
        Breaker.objects.filter(provider=provider)
        .values_list("state", "probe_at", "forced", "generation")
        .first()
    )
    if row is None:
        return None
    if row[0] == BreakerState.CLOSED:
        if generation is None:
            return None
        holds = kept_before(generation) if kept_before is not None else 0
        cfg = provider_config(provider)
        same = row[3] == generation
        in_a_row = failures_in_a_row(provider, generation, cfg) if same else 0
        if holds >= max(cfg.min_calls, 1):
            if in_a_row < 2:
                return None
            # min_calls holds, each after a failure with nobody answered since the one before:
            # failures in a row the window may not hold at once (a lone caller's tries come a
            # cool-down apart), but as far as anyone can tell, the provider is down.
            _open(
                provider,
                generation,
                cfg,
                timezone.now(),
                reason="a held-back saga's failures in a row",
                failed=holds + 1,
                calls=holds + 1,
            )
            return held_back(provider)
        if same and in_a_row < 2:
            earlier = previous() if previous is not None and attempts > 1 else None
            if holds or not failing_now(
                provider, generation, attempts=attempts, previous=earlier, cfg=cfg
            ):
                return None
        metrics.PARKED.labels(provider, "failing").inc()
        spread = random.uniform(0.05, max(cfg.release_spread, 0.05))
        delay = _cooldown(cfg).total_seconds() + spread
        return Wait(provider, delay, "failing", generation, holds + 1)
    metrics.PARKED.labels(provider, row[0]).inc()
    return _wait(provider, provider_config(provider), row[0], row[1], row[2], timezone.now())


#: Others' failed calls that must be among a provider's most recent ones for a saga's failed
#: last attempt to be held back while its breaker is still closed (:func:`failing_now`).
OTHERS_FAILED_MIN = 2


def failing_now(
    provider: str,
    generation: int,
    *,
    attempts: int = 1,
    previous: datetime | None = None,
    cfg: ProviderConfig | None = None,
) -> bool:
    """Are the provider's most recent calls failing, though its breaker has not opened?

    True if some stretch of its health window that ends now fails at ``failure_rate`` or more
    and holds :data:`OTHERS_FAILED_MIN` failed calls or more besides the asking saga's own:
    counted back from now, second by second, so the start of an outage shows however many
    successes came before it, and a stretch is judged as soon as it holds enough failures,
    ``min_calls`` or not. The saga's own: its latest attempt only, while the stretch begins
    in a second after ``previous`` (when the attempt before it was recorded); from that second
    back, all ``attempts`` (their times are not kept, so all are counted in). A saga failing
    alone (a quiet provider) is never held back by this (:func:`held_back` looks at its
    failures in a row for that), and a provider that answers others' calls between failures
    is not failing: every stretch with enough failures holds those successes too.
    ``generation``: calls admitted since the breaker last closed.
    """
    cfg = cfg or provider_config(provider)
    now = timezone.now()
    # The previous attempt's outcome was counted before its record was written, so in that
    # record's second at the latest: a stretch of later seconds holds the latest attempt only.
    own_from = None if previous is None else int(previous.timestamp())
    buckets = (
        _window(provider, generation, cfg, now)
        .order_by("-second")
        .values_list("second", "ok", "failed")
    )
    calls = failed = 0
    for second, ok_n, failed_n in buckets:
        calls += ok_n + failed_n
        failed += failed_n
        own = 1 if own_from is not None and second > own_from else max(attempts, 1)
        if failed - own >= OTHERS_FAILED_MIN and failed / calls >= cfg.failure_rate:
            return True
    return False


def _cooldown(cfg: ProviderConfig) -> timedelta:
    return timedelta(seconds=max(cfg.cooldown, 0.1))


def _take_canary(
    provider: str, cfg: ProviderConfig, now: datetime, held_for: timedelta
) -> int | None:
    """Become one of the half-open round's canaries (and open that round if it is due): the
    round's number, or ``None`` if no canary may go now.

    A new round (cool-down over, or the round's canaries presumed lost) gets a new number, so
    the outcome of a canary from an earlier one cannot count in it (:func:`_canary_outcome`).
    """
    t = _qn(Breaker._meta.db_table)
    new_round = f"({_qn('state')} = 'open' OR {_qn('probe_at')} <= %s)"
    sql = (
        f"UPDATE {t} SET {_qn('state')} = 'half_open', "
        f"{_qn('since')} = CASE WHEN {_qn('state')} = 'open' THEN %s ELSE {_qn('since')} END, "
        f"{_qn('canaries')} = CASE WHEN {new_round} THEN 1 ELSE {_qn('canaries')} + 1 END, "
        f"{_qn('canary_ok')} = CASE WHEN {new_round} THEN 0 ELSE {_qn('canary_ok')} END, "
        f"{_qn('canary_failed')} = CASE WHEN {new_round} THEN 0 ELSE {_qn('canary_failed')} END, "
        f"{_qn('probe_at')} = CASE WHEN {new_round} THEN %s ELSE {_qn('probe_at')} END, "
        f"{_qn('canary_round')} = CASE WHEN {new_round} THEN {_qn('canary_round')} + 1 "
        f"ELSE {_qn('canary_round')} END, "
        f"{_qn('updated_at')} = %s "
        f"WHERE {_qn('provider')} = %s AND NOT {_qn('forced')} AND ("
        f"({_qn('state')} = 'open' AND {_qn('probe_at')} <= %s) OR "
        f"({_qn('state')} = 'half_open' AND ({_qn('canaries')} < %s OR {_qn('probe_at')} <= %s))"
        f") RETURNING {_qn('since')}, {_qn('canary_round')}"
    )
    ops = connection.ops
    ts = ops.adapt_datetimefield_value
    params = [
        ts(now),  # since
        ts(now),  # canaries: a new round?
        ts(now),  # canary_ok: a new round?
        ts(now),  # canary_failed: a new round?
        ts(now),  # probe_at: a new round?
        ts(now + held_for),
        ts(now),  # canary_round: a new round?
        ts(now),
        provider,
        ts(now),
        cfg.canaries or 1,
        ts(now),
    ]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        row = cursor.fetchone()
    if row is None:
        return None
    since, canary_round = row
    if isinstance(since, str):  # SQLite
        since = datetime.fromisoformat(since)
    if since is not None and timezone.is_naive(since):
        since = timezone.make_aware(since, UTC)
    if since == now:
        _transitioned(provider, BreakerState.OPEN, BreakerState.HALF_OPEN, reason="cooldown over")
    metrics.CANARIES.labels(provider).inc()
    return int(canary_round)


def _return_canary(provider: str, canary_round: int) -> None:
    """A canary that could not get a call slot gives its place back (in its own round only:
    a round begun meanwhile has counted its canaries afresh)."""
    Breaker.objects.filter(
        provider=provider, state=BreakerState.HALF_OPEN, canary_round=canary_round, canaries__gt=0
    ).update(canaries=F("canaries") - 1)


def _take_slot(
    provider: str, cfg: ProviderConfig, now: datetime, held_for: timedelta
) -> tuple[int | None, datetime | None]:
    _ensure_slots(provider, cfg.max_in_flight)
    lease = now + held_for
    t = _qn(CallSlot._meta.db_table)
    lock = (
        " FOR UPDATE SKIP LOCKED" if connection.features.has_select_for_update_skip_locked else ""
    )
    ts = connection.ops.adapt_datetimefield_value
    sql = (
        f"UPDATE {t} SET {_qn('lease_until')} = %s WHERE {_qn('id')} = ("
        f"SELECT {_qn('id')} FROM {t} WHERE {_qn('provider')} = %s AND {_qn('n')} < %s AND "
        f"({_qn('lease_until')} IS NULL OR {_qn('lease_until')} <= %s) LIMIT 1{lock}"
        f") RETURNING {_qn('id')}"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, [ts(lease), provider, cfg.max_in_flight, ts(now)])
        row = cursor.fetchone()
        if row is None and CallSlot.objects.filter(provider=provider).count() < cfg.max_in_flight:
            # Not every slot busy: the rows are gone (a flushed test database). Recreate them
            # and look once more.
            _known_slots.pop(provider, None)
            _ensure_slots(provider, cfg.max_in_flight)
            cursor.execute(sql, [ts(lease), provider, cfg.max_in_flight, ts(now)])
            row = cursor.fetchone()
    return (row[0], lease) if row else (None, None)


def _release_slot(slot_id: int, lease: datetime | None) -> None:
    # Only our own lease: past it, the slot may already belong to another call.
    CallSlot.objects.filter(id=slot_id, lease_until=lease).update(lease_until=None)


def _take_rate(provider: str, generation: int, cfg: ProviderConfig, now: datetime) -> bool:
    t = _qn(HealthBucket._meta.db_table)
    sql = (
        f"INSERT INTO {t} ({_qn('provider')}, {_qn('generation')}, {_qn('second')}, "
        f"{_qn('ok')}, {_qn('failed')}, {_qn('started')}) VALUES (%s, %s, %s, 0, 0, 1) "
        f"ON CONFLICT ({_qn('provider')}, {_qn('generation')}, {_qn('second')}) DO UPDATE SET "
        f"{_qn('started')} = {t}.{_qn('started')} + 1 WHERE {t}.{_qn('started')} < %s "
        f"RETURNING {_qn('started')}"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, [provider, generation, int(now.timestamp()), cfg.rate])
        return cursor.fetchone() is not None


# ---------------------------------------------------------------------------------------------
# Outcomes
# ---------------------------------------------------------------------------------------------
def report(ticket: Ticket | None, *, ok: bool) -> None:
    """Count one call's outcome (``ok``: the provider answered, even with a business "no")."""
    if ticket is None:
        return
    try:
        _report(ticket, ok=ok)
    except DatabaseError as exc:
        # Health bookkeeping must never turn an answered call into a failed step; a slot not
        # released here comes back when its lease passes.
        log.warning("provider.report_failed", provider=ticket.provider, error=repr(exc))


def _report(ticket: Ticket, *, ok: bool) -> None:
    provider = ticket.provider
    now = timezone.now()
    if _one_statement_gate():
        _release_and_count(ticket, now, ok)
    else:
        if ticket.slot_id is not None:
            _release_slot(ticket.slot_id, ticket.slot_lease)
        _count(provider, ticket.generation, now, ok)
    metrics.CALLS.labels(provider, "ok" if ok else "failed").inc()
    cfg = provider_config(provider)
    if ticket.canary:
        _canary_outcome(provider, ticket.canary_round, cfg, now, ok)
    elif not ok:
        _maybe_open(provider, ticket.generation, cfg, now)


@functools.cache
def _count_sql(ok: bool) -> str:
    """One outcome counted in its second's health bucket: ``ok`` or ``failed`` one up, and the
    failures since the second's last success reset by a success or one up by a failure.
    Parameters: provider, generation, second."""
    h = _qn(HealthBucket._meta.db_table)
    column, since = _qn("ok" if ok else "failed"), _qn("failed_since_ok")
    after = "0" if ok else f"{h}.{since} + 1"
    return (
        f"INSERT INTO {h} ({_qn('provider')}, {_qn('generation')}, {_qn('second')}, "
        f"{_qn('ok')}, {_qn('failed')}, {since}, {_qn('started')}) "
        f"VALUES (%s, %s, %s, {int(ok)}, {int(not ok)}, {int(not ok)}, 0) "
        f"ON CONFLICT ({_qn('provider')}, {_qn('generation')}, {_qn('second')}) DO UPDATE SET "
        f"{column} = {h}.{column} + 1, {since} = {after}"
    )


def _count(provider: str, generation: int, now: datetime, ok: bool) -> None:
    second = int(now.timestamp())
    with connection.cursor() as cursor:
        cursor.execute(_count_sql(ok), [provider, generation, second])
    _trim(provider, second)


def _trim(provider: str, second: int) -> None:
    if random.random() < 0.01:
        # Old buckets are never read again; trimming now and then keeps the table tiny.
        # One plain DELETE: the ORM's delete() would wrap it in a transaction of its own,
        # three round trips for rows nothing points at.
        keep = provider_config(provider).window + 60
        t = _qn(HealthBucket._meta.db_table)
        with connection.cursor() as cursor:
            cursor.execute(
                f"DELETE FROM {t} WHERE {_qn('provider')} = %s AND {_qn('second')} < %s",
                [provider, second - keep],
            )


def _release_and_count(ticket: Ticket, now: datetime, ok: bool) -> None:
    """Give the call slot back and count the outcome in one statement (see
    :func:`_one_statement_gate`): the slot only if it is still this call's lease."""
    ctes, params = _outcome_ctes(ticket, now, ok)
    sql = f"WITH {NO_FLUSH_WAIT}, {ctes} SELECT 1 FROM nf"
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
    _trim(ticket.provider, int(now.timestamp()))


def _outcome_ctes(ticket: Ticket, now: datetime, ok: bool, tag: str = "") -> tuple[str, list[Any]]:
    """The slot release (if the call holds one) and the health count as data-modifying CTEs.

    PostgreSQL runs every data-modifying CTE of a statement to completion whether or not the
    rest of the statement reads it, so these take effect wherever they ride. ``tag`` names
    them apart from another call's outcome in the same statement.
    """
    t = _qn(CallSlot._meta.db_table)
    ts = connection.ops.adapt_datetimefield_value
    release, params = "", []
    if ticket.slot_id is not None:
        release = (
            f"pr{tag} AS (UPDATE {t} SET {_qn('lease_until')} = NULL "
            f"WHERE {_qn('id')} = %s AND {_qn('lease_until')} = %s RETURNING 1), "
        )
        params = [ticket.slot_id, ts(ticket.slot_lease)]
    count = f"ph{tag} AS ({_count_sql(ok)} RETURNING 1)"
    return release + count, [*params, ticket.provider, ticket.generation, int(now.timestamp())]


@dataclass(frozen=True)
class CarriedOutcome:
    """A call's "it answered" as SQL another statement carries (see :func:`carried_outcome`)."""

    ctes: str
    params: list[Any]
    ticket: Ticket
    second: int

    def carried(self) -> None:
        """The statement that carried it ran: what :func:`report` does besides the SQL."""
        metrics.CALLS.labels(self.ticket.provider, "ok").inc()
        _trim(self.ticket.provider, self.second)

    def report(self) -> None:
        """Nothing carried it (no such statement on this database): report it on its own."""
        report(self.ticket, ok=True)


#: The outcome of a call made inside a step's own transaction, reported after it committed:
#: it rides in this task's next admission or record (:func:`defer_outcome`). One at most: two
#: health counts of one provider and second cannot be one statement's (one row upserted twice).
_DEFERRED: ContextVar[CarriedOutcome | None] = ContextVar("provider_deferred_outcome", default=None)


def defer_outcome(ticket: Ticket | None) -> None:
    """A healthy call's outcome, reported once its step's own transaction has committed, left
    to ride in the next admission this task makes (:func:`admit`) or the next record that
    carries a call's outcome (:func:`take_deferred`), one round trip fewer.

    For a step whose participant writes in the saga's database and commits with the step's
    record: its outcome cannot ride in that record, which would hold the provider's shared
    health row locked until the step's commit, its flush to disk included, and every other
    worker's call to the provider would queue behind it. The task's next such statement comes
    a few milliseconds later. Only what :func:`carried_outcome` may carry waits so; the rest is
    reported at once, and so is an outcome still waiting when another comes. Whatever no
    statement took is reported by :func:`report_deferred`, which the engine calls when the task
    ends, and before a step that asks for no admission.
    """
    report_deferred()
    outcome = carried_outcome(ticket, tag="d")
    if outcome is None:
        report(ticket, ok=True)
        return
    _DEFERRED.set(outcome)


def report_deferred() -> None:
    """Report, in a statement of its own, the outcome :func:`defer_outcome` left waiting.

    Never raises: called as a task ends, maybe failing, on a connection that may be gone; an
    outcome not reported is a slot that comes back when its lease passes and one healthy call
    uncounted, as with a worker lost before its report.
    """
    deferred = _DEFERRED.get()
    if deferred is None:
        return
    _DEFERRED.set(None)
    try:
        deferred.report()
    except Exception as exc:  # report() logs database errors; this is what it lets through
        log.warning("provider.report_failed", provider=deferred.ticket.provider, error=repr(exc))


def take_deferred(*, other_than: str) -> CarriedOutcome | None:
    """The outcome :func:`defer_outcome` left waiting, for a statement other than an admission
    to carry (a saga's record), unless it is ``other_than``'s: one statement cannot count two
    calls in one health row. Taken, it is the carrier's to run or, failing that, to report."""
    deferred = _DEFERRED.get()
    if deferred is None or deferred.ticket.provider == other_than:
        return None
    _DEFERRED.set(None)
    return deferred


def carried_outcome(ticket: Ticket | None, *, tag: str = "") -> CarriedOutcome | None:
    """A healthy call's outcome for the saga's own record to carry, saving a round trip.

    Only the plain case: a call admitted by a closed breaker that answered. A canary's answer
    decides the breaker's next state and a failure may open it, so those are reported at once
    by :func:`report`. Carried, the slot is given back and the call counted when the record
    commits (a few milliseconds later); if that statement never runs, the slot comes back when
    its lease passes and one healthy call goes uncounted, as with a worker lost mid-report.
    """
    if ticket is None or ticket.canary or connection.vendor != "postgresql":
        return None
    now = timezone.now()
    ctes, params = _outcome_ctes(ticket, now, ok=True, tag=tag)
    return CarriedOutcome(ctes, params, ticket, int(now.timestamp()))


def _window(
    provider: str, generation: int, cfg: ProviderConfig, now: datetime
) -> QuerySet[HealthBucket]:
    """The provider's health buckets of this generation within its window, as of ``now``."""
    return HealthBucket.objects.filter(
        provider=provider, generation=generation, second__gte=int(now.timestamp() - cfg.window)
    )


def window_counts(
    provider: str, now: datetime | None = None, generation: int | None = None
) -> tuple[int, int]:
    """``(calls, failed)`` in the provider's window, counting calls admitted since it closed."""
    now = now or timezone.now()
    cfg = provider_config(provider)
    if generation is None:
        generation = (
            Breaker.objects.filter(provider=provider).values_list("generation", flat=True).first()
            or 0
        )
    totals = _window(provider, generation, cfg, now).aggregate(ok=Sum("ok"), failed=Sum("failed"))
    ok, failed = totals["ok"] or 0, totals["failed"] or 0
    return ok + failed, failed


#: The recent end of the window, checked on its own (see :func:`_maybe_open`).
RECENT_SECONDS = 2


def failures_in_a_row(
    provider: str, generation: int, cfg: ProviderConfig, now: datetime | None = None
) -> int:
    """The provider's latest failures with no call answered since the first of them, within
    its window and generation (as :func:`_maybe_open` counts them)."""
    rows = (
        _window(provider, generation, cfg, now or timezone.now())
        .order_by("-second")
        .values_list("ok", "failed_since_ok")
    )
    return _row(rows)


def _row(buckets: Iterable[tuple[int, int]]) -> int:
    """Failures in a row from ``(ok, failed_since_ok)`` buckets, newest first: each bucket's
    failures since its last success, back to the first bucket that holds a success (the
    second an outage began in holds the last successes and the first failures, in that
    order)."""
    in_a_row = 0
    for ok_n, since_ok in buckets:
        in_a_row += since_ok
        if ok_n > 0:
            break
    return in_a_row


def _maybe_open(provider: str, generation: int, cfg: ProviderConfig, now: datetime) -> None:
    """Open the breaker if the provider is failing, judged at three scales.

    - The whole window, with at least ``min_calls`` calls, failing at ``failure_rate``: a
      provider going bad slowly, or a quiet one.
    - Its last :data:`RECENT_SECONDS` seconds, with at least ``min_calls`` *failures*, failing
      at that rate: a busy provider that just fell over. Without it, a window full of earlier
      successes would hide an outage for half a window, long enough for sagas to spend all
      their attempts on it. Failures, not calls: a handful of unlucky calls in two seconds is
      noise, ten failures in two seconds at that rate is not.
    - Its latest failures in a row, ``min_calls`` of them or more with no call answered since
      the first, however far apart within the window: an outage met by a few callers whose
      retries spread their failures wider than two seconds (backed off, or held up by a broker
      outage at the same moment). Without it, a saga alone on the provider as it went down
      spent its last attempt on the outage with the breaker still closed, and was cancelled
      for it. Counted back second by second, each bucket's failures since its last success
      (``failed_since_ok``), to the first that holds a success: the second an outage began in
      holds the last successes and the first failures, in that order. In a row, not a share:
      at one failure in six, five failures in a row come about once in 7,800 calls, while five
      failures making half of some recent stretch of calls come about once in 110. (With
      ``min_calls`` at 1 or 2, one or two failures in a row open it whatever the rate.)
    """
    second = int(now.timestamp())
    rows = list(
        _window(provider, generation, cfg, now)
        .order_by("-second")
        .values_list("second", "ok", "failed", "failed_since_ok")
    )
    calls = failed = recent_calls = recent_failed = 0
    for at, ok_n, failed_n, _ in rows:
        calls += ok_n + failed_n
        failed += failed_n
        if at > second - RECENT_SECONDS:
            recent_calls += ok_n + failed_n
            recent_failed += failed_n
    in_a_row = _row((ok_n, since_ok) for _, ok_n, _, since_ok in rows)
    minimum = max(cfg.min_calls, 1)
    reason = "failure rate"
    if calls >= minimum and failed / calls >= cfg.failure_rate:
        pass
    elif recent_failed >= minimum and recent_failed / recent_calls >= cfg.failure_rate:
        calls, failed = recent_calls, recent_failed
    elif in_a_row >= minimum:
        calls = failed = in_a_row
        reason = "failures in a row"
    else:
        return
    _open(provider, generation, cfg, now, reason=reason, failed=failed, calls=calls)


def _open(
    provider: str,
    generation: int,
    cfg: ProviderConfig,
    now: datetime,
    *,
    reason: str,
    failed: int,
    calls: int,
) -> None:
    """Open the breaker if it is still closed in ``generation`` (and log the transition)."""
    opened = Breaker.objects.filter(
        provider=provider, state=BreakerState.CLOSED, generation=generation
    ).update(
        state=BreakerState.OPEN,
        since=now,
        probe_at=now + _cooldown(cfg),
        canaries=0,
        canary_ok=0,
        canary_failed=0,
        updated_at=now,
    )
    if opened:
        _transitioned(
            provider,
            BreakerState.CLOSED,
            BreakerState.OPEN,
            reason=reason,
            failure_rate=round(failed / calls, 3),
            calls=calls,
        )


def canary_verdicts(cfg: ProviderConfig) -> tuple[int, int]:
    """``(failures that re-open, successes that close)`` in one half-open round.

    The round is judged like the window, by ``failure_rate``: it re-opens once its failed
    canaries are that share of ``canaries`` (at least one), and closes once so many succeeded
    that the rest could no longer reach it. A single unlucky canary (a request that fails on
    its own, such as a void the provider refuses for that card, or one transient error) then
    no longer holds a recovered provider open for another cool-down, while a provider still
    down fails them all. With one canary, or two at the default rate, one failure re-opens.
    """
    canaries = max(cfg.canaries, 1)
    to_open = min(canaries, max(1, math.ceil(canaries * cfg.failure_rate - 1e-9)))
    return to_open, canaries - to_open + 1


def _canary_outcome(
    provider: str, canary_round: int, cfg: ProviderConfig, now: datetime, ok: bool
) -> None:
    """Count a canary's answer in its half-open round, and judge the round on it.

    Only in the round that let it through: a canary answering after that round ended (the
    breaker re-opened on the others' failures, or its lease passed and a new round began)
    saw the provider before what the breaker knows now, so it must neither close the breaker
    on an old success nor re-open it on an old failure. Each statement below is one
    conditional ``UPDATE`` naming the round in its ``WHERE``: no read stands between the check
    and the change, so a round another worker begins meanwhile is never counted into or
    judged. The call is still counted in the health buckets (:func:`_report`): it happened,
    and those count calls, not rounds.
    """
    to_open, to_close = canary_verdicts(cfg)
    this_round = Breaker.objects.filter(
        provider=provider, state=BreakerState.HALF_OPEN, canary_round=canary_round
    )
    if not ok:
        this_round.update(canary_failed=F("canary_failed") + 1, updated_at=now)
        reopened = this_round.filter(canary_failed__gte=to_open).update(
            state=BreakerState.OPEN,
            since=now,
            probe_at=now + _cooldown(cfg),
            canaries=0,
            canary_ok=0,
            canary_failed=0,
            updated_at=now,
        )
        if reopened:
            _transitioned(
                provider, BreakerState.HALF_OPEN, BreakerState.OPEN, reason="canaries failed"
            )
        return
    this_round.update(canary_ok=F("canary_ok") + 1, updated_at=now)
    closed = this_round.filter(canary_ok__gte=to_close).update(
        state=BreakerState.CLOSED,
        since=now,
        probe_at=None,
        canaries=0,
        canary_ok=0,
        canary_failed=0,
        generation=F("generation") + 1,
        updated_at=now,
    )
    if closed:
        _transitioned(provider, BreakerState.HALF_OPEN, BreakerState.CLOSED, reason="canaries ok")


def _transitioned(provider: str, old: str, new: str, *, reason: str, **extra: object) -> None:
    """The one structured log line (and counter) per breaker transition; a closing one is
    also announced (:data:`breaker_closed`) once committed."""
    metrics.TRANSITIONS.labels(provider, str(new)).inc()
    log.warning(
        "provider.breaker_transition",
        provider=provider,
        from_state=str(old),
        to_state=str(new),
        reason=reason,
        **extra,
    )
    if new == BreakerState.CLOSED and old != BreakerState.CLOSED:
        transaction.on_commit(lambda: _announce_closed(provider))


def _announce_closed(provider: str) -> None:
    for receiver, result in breaker_closed.send_robust(sender=Breaker, provider=provider):
        if isinstance(result, Exception):
            log.warning(
                "provider.breaker_closed_receiver_failed",
                provider=provider,
                receiver=getattr(receiver, "__qualname__", repr(receiver)),
                error=repr(result),
            )


def recheck_after(wait: Wait, parked_for: Callable[[], float]) -> float:
    """How long a saga that has been parked on ``wait.provider`` for ``parked_for()`` seconds,
    and finds its breaker still not closed, waits before it looks again (``parked_for`` is
    only asked when the answer depends on it: it costs the caller a read).

    With the provider's ``park_max`` at 0 (the default), at the breaker's next probe
    (``wait.delay``). Above 0, about as long again as it has waited (times 1 to 1.25), at
    most ``park_max``, and never less than ``wait.delay``. Each look costs a claim, a gate, a
    read of the stay's start and a record, so a thousand sagas parked through a long outage
    come back at every probe: a few thousand statements and tasks per cool-down while
    nothing can happen. With re-checks they need not, since :data:`breaker_closed` wakes
    them when the provider is back; their looks still serve as the canaries that find it.
    Limit waits (``in_flight``, ``rate``) are short by nature and are left as they are.
    """
    cfg = provider_config(wait.provider)
    if not cfg.park_max or wait.reason not in (BreakerState.OPEN, BreakerState.HALF_OPEN):
        return wait.delay
    backoff = min(max(parked_for(), 0.0) * random.uniform(1.0, 1.25), cfg.park_max)
    return max(wait.delay, backoff)


# ---------------------------------------------------------------------------------------------
# People
# ---------------------------------------------------------------------------------------------
def force(provider: str, to: str, *, user: Any | None, request: HttpRequest | None = None) -> str:
    """Force a breaker open (held until force-closed) or closed (health counted afresh).

    Recorded in the audit log with the user; returns the state it left.
    """
    from audit.services import audit_record

    if to not in (BreakerState.OPEN, BreakerState.CLOSED):
        raise ValueError(f"a breaker can be forced open or closed, not {to!r}")
    ensure_breaker(provider)
    now = timezone.now()
    with transaction.atomic():
        old = (
            Breaker.objects.select_for_update()
            .values_list("state", flat=True)
            .get(provider=provider)
        )
        Breaker.objects.filter(provider=provider).update(
            state=to,
            forced=to == BreakerState.OPEN,
            since=now,
            probe_at=None,
            canaries=0,
            canary_ok=0,
            canary_failed=0,
            generation=F("generation") + (1 if to == BreakerState.CLOSED else 0),
            updated_at=now,
        )
        entry = audit_record(
            f"breaker.force_{to}",
            actor=user,
            target=f"provider:{provider}",
            detail={"from_state": str(old)},
            request=request,
        )
    _transitioned(provider, old, to, reason=f"forced by {entry.actor_name}")
    return old
