"""Reads of sagas shared by the ops console and the REST API.

"Stuck" means what the sweeper means: an active saga whose next piece of work
is overdue by more than ``SAGA_STUCK_AFTER`` and whose lease has expired, so no worker holds it.
The sweeper re-rings such sagas; one that stays on this list has a problem worth a look.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TypedDict

from django.conf import settings
from django.db import connection
from django.db.models import Count, Q, QuerySet
from django.utils import timezone

from sagas.definition import registered_definitions
from sagas.models import ACTIVE_STATES, Saga, SagaState


def saga_stuck_q(*, now: datetime | None = None) -> Q:
    """The "stuck" condition as a ``Q`` on :class:`~sagas.models.Saga`, to filter or exclude."""
    now = now or timezone.now()
    overdue_before = now - timedelta(seconds=settings.SAGA_STUCK_AFTER)
    return Q(state__in=ACTIVE_STATES, next_attempt_at__lte=overdue_before) & (
        Q(lease_until__isnull=True) | Q(lease_until__lte=now)
    )


#: The waiting-for filter's value for "a signal only staff send" (a signal name has no ``*``).
STAFF_WAITS = "*staff"


def staff_signals_by_type() -> dict[str, set[str]]:
    """Per saga type, the signals only ops staff may send (a ``Wait`` without a ``client``),
    over every registered version: a saga waiting for one waits for someone in the ops
    console. Per type, since another type may let its client send a signal of the same name."""
    out: dict[str, set[str]] = {}
    for definition in registered_definitions():
        parks = [step.park for step in definition.steps if step.park is not None]
        names = {park.signal for park in parks if park.signal and park.client is None}
        out.setdefault(definition.saga_type, set()).update(names)
    return out


def saga_waiting_for_staff_q() -> Q:
    """Active sagas parked on a signal only staff send (see :func:`staff_signals_by_type`)."""
    which = Q(pk__in=[])
    for saga_type, names in staff_signals_by_type().items():
        if names:
            which |= Q(saga_type=saga_type, waiting_for__in=sorted(names))
    return Q(state__in=ACTIVE_STATES, waiting_since__isnull=False) & which


def sagas_stuck(*, now: datetime | None = None) -> QuerySet[Saga]:
    """Active sagas overdue by more than ``SAGA_STUCK_AFTER`` with no live lease, oldest due
    first. Served by the partial index on ``next_attempt_at`` for active states."""
    return Saga.objects.filter(saga_stuck_q(now=now)).order_by("next_attempt_at")


def saga_is_stuck(saga: Saga, *, now: datetime | None = None) -> bool:
    """The same condition for one loaded saga, without a query."""
    now = now or timezone.now()
    if saga.state not in ACTIVE_STATES or saga.next_attempt_at is None:
        return False
    if saga.next_attempt_at > now - timedelta(seconds=settings.SAGA_STUCK_AFTER):
        return False
    return saga.lease_until is None or saga.lease_until <= now


# ---------------------------------------------------------------------------------------------
# The ops console's overview (admin dashboard): bounded reads, whatever the table size.
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SagaCount:
    """A count that is exact up to a cap and a planner estimate above it."""

    value: int
    exact: bool


def saga_count_bounded(queryset: QuerySet[Saga], *, cap: int = 10_000) -> SagaCount:
    """Count ``queryset`` reading at most ``cap + 1`` index entries; estimate above the cap.

    A plain ``COUNT(*)`` over a million rows costs a scan on every page load; the cap keeps
    the cost constant, and above it nobody needs the last digit. The estimate is PostgreSQL's
    own (``EXPLAIN``), never below the cap.
    """
    found = queryset.order_by()[: cap + 1].count()
    if found <= cap:
        return SagaCount(found, exact=True)
    return SagaCount(max(queryset_estimate(queryset), cap + 1), exact=False)


def queryset_estimate(queryset: QuerySet) -> int:
    """PostgreSQL's row estimate for a queryset (``EXPLAIN``); ``-1`` on other databases."""
    if connection.vendor != "postgresql":
        return -1
    sql, params = queryset.order_by().query.sql_with_params()
    with connection.cursor() as cursor:
        cursor.execute(f"EXPLAIN (FORMAT JSON) {sql}", params)
        plan = cursor.fetchone()[0]
    if isinstance(plan, str):
        plan = json.loads(plan)
    return int(plan[0]["Plan"]["Plan Rows"])


def saga_state_counts(*, cap: int = 10_000) -> dict[str, SagaCount]:
    """Sagas per state, each exact up to ``cap`` (one short index read per state)."""
    return {
        state: saga_count_bounded(Saga.objects.filter(state=state), cap=cap)
        for state in SagaState.values
    }


class FailureSignature(TypedDict):
    failed_step: str
    failure_code: str
    count: int


def saga_failure_signatures(*, since: datetime, limit: int = 10) -> list[FailureSignature]:
    """The most common ``(failed_step, failure_code)`` pairs of sagas started since ``since``.

    Each item: ``{"failed_step", "failure_code", "count"}``, most frequent first. Reads only
    the sagas that failed in the window (partial index on ``created_at`` of failed sagas).
    """
    return list(
        Saga.objects.filter(created_at__gte=since)
        .exclude(failed_step="")
        .values("failed_step", "failure_code")
        .annotate(count=Count("*"))
        .order_by("-count", "failed_step", "failure_code")[:limit]
    )


def sagas_with_failure_signature(*, failed_step: str, failure_code: str) -> QuerySet[Saga]:
    """Every saga that failed at ``failed_step`` with ``failure_code`` (saga_failure_sig_idx)."""
    return Saga.objects.filter(failed_step=failed_step, failure_code=failure_code)


# ---------------------------------------------------------------------------------------------
# Definition versions: the deploy check and the dashboard
# ---------------------------------------------------------------------------------------------
#: States in which a saga still needs its definition: it may run, undo, or be retried by a
#: person. Only succeeded, compensated and resolved sagas can lose theirs.
UNSETTLED = ("running", "compensating", "needs_manual")


@dataclass(frozen=True)
class VersionCount:
    saga_type: str
    version: int
    fingerprint: str
    count: int


def unsettled_versions() -> list[VersionCount]:
    """Unfinished sagas per type, definition version and recorded fingerprint."""
    rows = (
        Saga.objects.filter(state__in=UNSETTLED)
        .values_list("saga_type", "definition_version", "definition_fingerprint")
        .annotate(n=Count("*"))
        .order_by("saga_type", "definition_version", "definition_fingerprint")
    )
    return [VersionCount(*row) for row in rows]
