"""The sweeper: the beat task that finds what the broker lost and what ran out of time.

Rings again for sagas whose work is overdue and whose lease expired (a lost doorbell, a killed
worker), and cancels sagas past their deadline that have not reached their pivot. It reads the
database, so nothing a broker loses stays lost for longer than ``SAGA_STUCK_AFTER`` (doubled
per unanswered ring); of the broker it only asks how deep the saga queue is, so as not to ring
again for sagas whose doorbells may still be waiting in it.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import structlog
from django.conf import settings
from django.db import connection, transaction
from django.db.models import Q, QuerySet
from django.utils import timezone

from providers.config import provider_config
from sagas import doorbell, metrics, pumps
from sagas.definition import registered_definitions
from sagas.doorbell import ring, ring_many
from sagas.exceptions import SagaOperationRefused
from sagas.models import ACTIVE_STATES, Saga, SagaState
from sagas.services import saga_request_cancel
from sagas.store import due_saga, prep
from sagas.timing import timeout_of

log = structlog.get_logger("sagas.engine")

_ACTIVE = tuple(str(s) for s in ACTIVE_STATES)
# The sweeper's re-ring backoff stops doubling here (32 x SAGA_STUCK_AFTER).
_MAX_SWEEP_DOUBLINGS = 5
# A repeat ring held back while the queue could still hold the saga's doorbell goes out anyway
# once the saga has waited this long since its last ring (1024 x SAGA_STUCK_AFTER): a queue
# that never drains below the overdue count cannot hold a lost doorbell back for ever.
_HOLD_BACK_DOUBLINGS = 10


def sweep(now: datetime | None = None) -> dict[str, int]:
    """Ring for overdue sagas whose lease expired, and time out sagas past their deadline.

    Cost grows with the number of overdue sagas (a partial index holds only active ones), not
    with the table. ``FOR UPDATE SKIP LOCKED`` plus pushing ``next_attempt_at`` to now makes two
    sweeps at once harmless: each rings for different sagas, and a duplicate ring is fenced.

    A saga overdue *again* after a ring of ours (``sweeps`` >= 1) is either waiting in a
    backlog or lost its doorbell a second time. While the saga queue holds at least as many
    messages as there are such sagas, their doorbells may all still be in it, and another ring
    would only add a stale message behind them (each one a task): they are held back until the
    queue drains below that, which is when a new ring would have been reached anyway. A first
    re-ring (``sweeps`` = 0) always goes out, so a doorbell lost once (a broker restart, a
    killed worker) is replaced at once, as is every saga past ``_HOLD_BACK_DOUBLINGS``.
    """
    now = now or timezone.now()
    stuck_after = settings.SAGA_STUCK_AFTER
    # Overdue by SAGA_STUCK_AFTER, doubled for every ring that has not been answered yet.
    overdue = Q()
    for n in range(_MAX_SWEEP_DOUBLINGS):
        overdue |= Q(sweeps=n, next_attempt_at__lte=now - timedelta(seconds=stuck_after * 2**n))
    overdue |= Q(
        sweeps__gte=_MAX_SWEEP_DOUBLINGS,
        next_attempt_at__lte=now - timedelta(seconds=stuck_after * 2**_MAX_SWEEP_DOUBLINGS),
    )
    batch = settings.SAGA_SWEEP_BATCH
    due = (
        Saga.objects.filter(
            state__in=_ACTIVE, next_attempt_at__lte=now - timedelta(seconds=stuck_after)
        )
        .filter(Q(lease_until__isnull=True) | Q(lease_until__lte=now))
        .filter(overdue)
    )
    held_back = 0
    repeats = due.filter(sweeps__gte=1).order_by().values("id")[:batch].count()
    if repeats:
        depth = doorbell.queued_doorbells()
        if depth is not None and depth >= repeats:
            long_ago = now - timedelta(seconds=stuck_after * 2**_HOLD_BACK_DOUBLINGS)
            due = due.filter(Q(sweeps=0) | Q(next_attempt_at__lte=long_ago))
            held_back = repeats
            metrics.SWEEP_HELD_BACK.inc(repeats)
            log.info("saga.sweep_held_back", count=repeats, queued=depth)
    rows = _rearm_and_ring(due, now, batch, count_sweep=True)
    if rows:
        metrics.SWEEP_REDISPATCHED.inc(len(rows))
        log.info("saga.sweep_redispatched", count=len(rows))
    pumped = _pump_backstop(now)

    # Past the deadline and still before its pivot (after it, a saga must finish, not undo).
    # The pivot test is in SQL so sagas past their pivot never fill the batch and starve the rest.
    before_pivot = Q()
    for definition in registered_definitions():
        before_pivot |= Q(
            saga_type=definition.saga_type,
            definition_version=definition.version,
            current_step__in=definition.names[: definition.pivot_index],
        )
    timed_out = 0
    late = (
        Saga.objects.filter(state=SagaState.RUNNING, cancel_reason="", deadline_at__lte=now)
        .filter(before_pivot)
        .order_by("deadline_at")
        .values_list("id", flat=True)[:batch]
        if before_pivot
        else []
    )
    for saga_id in late:
        try:
            saga_request_cancel(saga_id=saga_id, reason="timed_out", actor="sweeper")
            timed_out += 1
        except (SagaOperationRefused, LookupError):
            continue  # it moved on (pivot reached, finished) since the query: nothing to do
    return {
        "redispatched": len(rows),
        "timed_out": timed_out,
        "held_back": held_back,
        "pumped": pumped,
    }


def _pump_backstop(now: datetime) -> int:
    """A pump for sagas that waited longer than a pump's budget for one: 1 if it rang.

    A start sends nothing while every pump slot is taken, counting on a holder's last look.
    Slots whose holders cannot look (a worker killed mid-pump, a worker on older code, a
    release Redis lost) stay taken until they expire, a lease later. One doorbell per sweep
    that holds no slot and pumps like any other caps that wait at about a sweep interval; when
    the pumps are merely busy (a backlog), it is one more task that ends after its budget.
    """
    if not pumps.enabled():
        return 0
    waited = now - timedelta(seconds=settings.SAGA_INLINE_BUDGET + 1.0)
    due = due_saga(due_before=waited)
    if due is None:
        return 0
    log.info("saga.pump_backstop", saga_id=str(due[0]))
    transaction.on_commit(lambda: ring(due[0], due[1], pump=pumps.NO_SLOT))
    return 1


def _rearm_and_ring(
    due: QuerySet[Saga],
    now: datetime,
    batch: int,
    *,
    count_sweep: bool,
    latest_first: bool = False,
    spread: float = 0.0,
) -> list[tuple[Any, int, float]]:
    """Make up to ``batch`` of ``due`` due now and ring them after commit.

    Pick and re-arm in one statement: ``UPDATE ... WHERE id IN (SELECT ... FOR UPDATE SKIP
    LOCKED LIMIT n) RETURNING id, version``, so two callers at once ring different sagas.
    ``count_sweep``: count the ring in ``sweeps`` (the sweeper's backoff for rings that go
    unanswered). The oldest due first, or with ``latest_first`` those due the furthest ahead;
    ``spread``: see :func:`sagas.doorbell.ring_many`.
    """
    order = "-next_attempt_at" if latest_first else "next_attempt_at"
    picked = due.select_for_update(skip_locked=True).order_by(order).values("id")
    qn = connection.ops.quote_name
    sweeps = f", {qn('sweeps')} = {qn('sweeps')} + 1" if count_sweep else ""
    due_at, due_params = "%s", [prep("next_attempt_at", now)]
    if spread > 0 and connection.vendor == "postgresql":
        # Each row due at its own moment within the spread, and its doorbell's countdown the
        # same: the pumps (which claim due rows from the database) keep the wave spread too.
        due_at = "%s::timestamptz + make_interval(secs => random() * %s::float8)"
        due_params.append(spread)
    with transaction.atomic():
        picked_sql, picked_params = picked[:batch].query.sql_with_params()
        with connection.cursor() as cursor:
            cursor.execute(
                f"UPDATE {qn(Saga._meta.db_table)} SET {qn('next_attempt_at')} = {due_at}"
                f"{sweeps} WHERE {qn('id')} IN ({picked_sql}) "
                f"RETURNING {qn('id')}, {qn('version')}, {qn('saga_type')}, "
                f"{qn('definition_version')}, {qn('current_step')}, {qn('next_attempt_at')}",
                [*due_params, *picked_params],
            )
            to_uuid = Saga._meta.pk.to_python
            fetched = cursor.fetchall()
        rows = [
            (to_uuid(saga_id), version, timeout_of(saga_type, definition_version, step))
            for saga_id, version, saga_type, definition_version, step, _ in fetched
        ]
        if rows and len(due_params) > 1:
            countdowns = [(at - now).total_seconds() for *_, at in fetched]
            transaction.on_commit(lambda: ring_many(rows, countdowns=countdowns))
        elif rows:
            transaction.on_commit(lambda: ring_many(rows, spread=spread))
    return rows


def wake_parked(provider: str, now: datetime | None = None) -> int:
    """The provider's breaker closed: ring the sagas parked on it, up to a sweep's batch.

    Parked sagas look again at the next probe, or with the provider's ``park_max`` less and
    less often while an outage lasts (``providers.breaker.recheck_after``); this brings them
    back when the provider does, as a wave over the provider's ``release_spread`` (each
    doorbell a random countdown within it), those due the furthest ahead first. A saga whose
    lease is live is working and is left alone (one looking at the breaker just as it closes
    parks again and comes back at its own next look). Best effort: beyond
    ``SAGA_SWEEP_BATCH``, or if this fails, the rest come back at their own next look, or by
    the sweeper. Returns how many were rung.
    """
    now = now or timezone.now()
    parked = Saga.objects.filter(parked_on=provider, state__in=_ACTIVE).filter(
        Q(lease_until__isnull=True) | Q(lease_until__lte=now)
    )
    rows = _rearm_and_ring(
        parked,
        now,
        settings.SAGA_SWEEP_BATCH,
        count_sweep=False,
        latest_first=True,
        spread=provider_config(provider).release_spread,
    )
    if rows:
        log.info("saga.parked_woken", provider=provider, count=len(rows))
    return len(rows)


def wake_parked_on_close(sender: Any, provider: str, **_kwargs: Any) -> None:
    """Receiver of ``providers.breaker.breaker_closed`` (connected in ``SagasConfig.ready``)."""
    wake_parked(provider)
