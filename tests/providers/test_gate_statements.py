"""How many statements the provider gate costs a call, and what it never loosens.

Every provider call pays the gate twice (admission, outcome), so in a worker, outside any
transaction, each is one statement whose commit does not wait for the disk.
"""

from __future__ import annotations

import inspect

import pytest
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext

from providers import breaker
from providers.breaker import Ticket, admit, report
from providers.models import CallSlot, HealthBucket

from . import test_breaker as portable
from .test_breaker import KNOBS

pytestmark = pytest.mark.django_db(transaction=True)

TRIM = 'DELETE FROM "providers_healthbucket"'


@pytest.fixture(autouse=True)
def knobs(settings):
    settings.SAGA_PROVIDERS = {"card": KNOBS}
    breaker._known_breakers.clear()
    breaker._known_slots.clear()


def test_outside_a_transaction_admission_and_outcome_are_one_statement_each():
    report(admit("card"), ok=True)  # rows created and cached
    with CaptureQueriesContext(connection) as admitted:
        ticket = admit("card")
    assert isinstance(ticket, Ticket) and ticket.slot_id is not None
    assert CallSlot.objects.filter(id=ticket.slot_id, lease_until=ticket.slot_lease).exists()
    with CaptureQueriesContext(connection) as reported:
        report(ticket, ok=True)
    assert len(admitted.captured_queries) == 1, admitted.captured_queries
    # One in a hundred outcomes also trims old health buckets, in one statement of its own.
    trims = [q for q in reported.captured_queries if q["sql"].startswith(TRIM)]
    assert len(trims) <= 1, reported.captured_queries
    assert len(reported.captured_queries) - len(trims) == 1, reported.captured_queries
    assert not CallSlot.objects.filter(lease_until__isnull=False).exists()
    assert breaker.window_counts("card") == (2, 0)


def test_the_sampled_trim_drops_only_this_providers_buckets_past_the_window(monkeypatch):
    """Outcomes trim old buckets now and then (one in a hundred); forced here, the trim is
    one statement and keeps every bucket the window (plus a minute) can still read."""
    import time

    now = int(time.time())
    keep = KNOBS["window"] + 60
    for provider, second in [("card", now - keep - 5), ("card", now - 10), ("bank", 0)]:
        HealthBucket.objects.create(provider=provider, second=second)
    monkeypatch.setattr(breaker.random, "random", lambda: 0.0)  # this outcome is sampled
    ticket = admit("card")
    with CaptureQueriesContext(connection) as reported:
        report(ticket, ok=True)
    trims = [q for q in reported.captured_queries if q["sql"].startswith(TRIM)]
    assert len(trims) == 1, reported.captured_queries
    assert sorted(
        HealthBucket.objects.filter(second__lt=now - 1).values_list("provider", "second")
    ) == [("bank", 0), ("card", now - 10)]


def test_inside_a_transaction_the_gate_leaves_its_commit_durable():
    """The one-statement path turns off the flush wait of its own commit; inside a step's
    transaction that would loosen the step's commit too, so there it must not be used."""
    with transaction.atomic():
        report(admit("card"), ok=False)
        with connection.cursor() as cursor:
            cursor.execute("SHOW synchronous_commit")
            assert cursor.fetchone()[0] == "on"


#: The breaker's behaviour that the one-statement path takes its own SQL for: a closed
#: breaker's slot taken with its row, a breaker not closed (no slot taken with it), rows gone.
SAME_ON_THE_ONE_STATEMENT_PATH = [
    portable.test_open_parks_calls_then_canaries_close_it_or_open_it_again,
    portable.test_in_flight_limit_and_a_lost_call_slot_comes_back_after_its_lease,
    portable.test_rows_deleted_under_a_running_process_are_recreated_not_fatal,
    portable.test_a_sudden_outage_opens_it_even_when_the_window_is_full_of_earlier_successes,
    portable.test_rate_limit_per_second,
]


@pytest.mark.parametrize("check", SAME_ON_THE_ONE_STATEMENT_PATH, ids=lambda f: f.__name__[5:])
def test_the_breaker_behaves_the_same_outside_a_transaction(check, settings):
    """``test_breaker`` runs inside a transaction (the portable path); these run its checks
    again where a worker runs them."""
    assert not connection.in_atomic_block
    check(**({"settings": settings} if inspect.signature(check).parameters else {}))
