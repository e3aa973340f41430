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
from providers.models import Breaker, BreakerState, CallSlot, HealthBucket

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


def _leased() -> set[int]:
    return set(CallSlot.objects.filter(lease_until__isnull=False).values_list("id", flat=True))


def test_a_deferred_outcome_rides_in_the_next_admission(monkeypatch):
    """The outcome of a call made inside a step's own transaction, deferred once it committed,
    takes effect in the task's next admission: the slot given back and the call counted in
    that one statement. One waits at most: a second reports the first on its own (one
    statement cannot count two calls in one health row)."""
    monkeypatch.setattr(breaker.random, "random", lambda: 1.0)  # no sampled trim
    report(admit("card"), ok=True)  # rows created and cached
    first, second = admit("card"), admit("card")
    assert isinstance(first, Ticket) and isinstance(second, Ticket)
    breaker.defer_outcome(first)
    assert _leased() == {first.slot_id, second.slot_id}  # nothing reported yet
    assert breaker.window_counts("card") == (1, 0)
    with CaptureQueriesContext(connection) as deferred:
        breaker.defer_outcome(second)
    assert len(deferred.captured_queries) == 1  # the first, reported on its own
    assert _leased() == {second.slot_id} and breaker.window_counts("card") == (2, 0)

    with CaptureQueriesContext(connection) as admitted:
        third = admit("card")
    assert len(admitted.captured_queries) == 1, admitted.captured_queries
    assert isinstance(third, Ticket) and _leased() == {third.slot_id}
    assert breaker.window_counts("card") == (3, 0)
    with CaptureQueriesContext(connection) as later:
        breaker.report_deferred()  # nothing left to report
    assert later.captured_queries == []


def test_deferred_outcomes_no_admission_took_are_reported_on_their_own(monkeypatch):
    """A task whose last call was in a step's own transaction reports its outcome before it
    ends (``report_deferred``): each in one statement, and the next admission carries none."""
    monkeypatch.setattr(breaker.random, "random", lambda: 1.0)
    ticket = admit("card")
    breaker.defer_outcome(ticket)
    with CaptureQueriesContext(connection) as reported:
        breaker.report_deferred()
    assert len(reported.captured_queries) == 1, reported.captured_queries
    assert _leased() == set() and breaker.window_counts("card") == (1, 0)
    with CaptureQueriesContext(connection) as admitted:
        admit("card")
    assert 'INSERT INTO "providers_healthbucket"' not in admitted.captured_queries[0]["sql"]
    assert breaker.window_counts("card") == (1, 0)


def test_an_outcome_that_cannot_ride_never_fails_the_admission_carrying_it():
    """Bookkeeping must not fail a call: an admission whose carried outcome fails (here a
    provider name too long for the health row; a deadlock on a slot taken again would do the
    same) is asked again without it, and the outcome is left for ``report_deferred``."""
    admit("card")  # rows created and cached
    breaker.defer_outcome(Ticket("p" * 100))  # its health count cannot be written
    ticket = admit("card")
    assert isinstance(ticket, Ticket) and ticket.slot_id is not None
    assert ticket.slot_id in _leased()  # admitted, its slot taken
    assert breaker._DEFERRED.get() is not None  # still waiting, not lost in the failed try
    breaker.report_deferred()  # reported on its own: the error is logged, not raised
    assert breaker._DEFERRED.get() is None


def test_a_transactional_calls_outcome_is_reported_before_a_step_the_gate_does_not_see(settings):
    """A step after a transactional step's call asks for no admission to carry its outcome:
    the outcome is reported before that step runs, not held (with its call slot) to the
    task's end."""
    from sagas.models import Saga, SagaState, SagaStep
    from sagas.runner import advance
    from sagas.services import saga_start
    from tests.sagas.inprocess import only_this_process
    from tests.sagas.sagatypes import ensure_effects_table

    ensure_effects_table()
    settings.SAGA_INLINE_BUDGET = 600.0  # both steps in one task
    with only_this_process():
        saga = saga_start(saga_type="test_tx_provider", data={"script": {}})
        advance(saga.id, saga.version)
    assert Saga.objects.get(pk=saga.id).state == SagaState.SUCCEEDED
    assert SagaStep.objects.get(saga_id=saga.id, name="b").result == {"leased": 0}
    assert _leased() == set() and breaker.window_counts("card") == (1, 0)


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


LANDED = "EXISTS (SELECT 1 FROM s)"


def _carry(admission: breaker.AdmissionAhead, *, landed: bool = True) -> None:
    """Run ``admission`` in a statement of another's, as a saga's record carries it: its
    columns come back only if the carrier's own CTE (``s``, the record) has a row."""
    sql = (
        f"WITH s AS (SELECT 1 AS x WHERE %s), {admission.ctes} "
        f"SELECT s.x, {', '.join(admission.columns)} FROM s"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, [landed, *admission.params])
        row = cursor.fetchone()
    if row is not None:
        admission.took(row[1:])


def test_an_admission_carried_ahead_lets_the_call_through_without_a_statement():
    """The record before a step carries its admission: the breaker's row read and a call slot
    taken in that statement, so the step's own admit() asks nothing of the database."""
    report(admit("card"), ok=True)  # rows created and cached
    admission = breaker.admission_ahead("card", 5.0, LANDED)
    assert admission is not None
    _carry(admission)
    assert len(_leased()) == 1
    with CaptureQueriesContext(connection) as admitted:
        ticket = admit("card", 5.0)
    assert admitted.captured_queries == []
    assert isinstance(ticket, Ticket) and _leased() == {ticket.slot_id}
    assert CallSlot.objects.filter(id=ticket.slot_id, lease_until=ticket.slot_lease).exists()
    report(ticket, ok=True)
    assert _leased() == set() and breaker._AHEAD.get() is None


def test_an_admission_ahead_takes_no_slot_unless_its_record_landed():
    """A record fenced off (its saga moved on) takes no call slot for a step it will not run,
    and leaves nothing for the next admit() to use."""
    report(admit("card"), ok=True)
    admission = breaker.admission_ahead("card", None, LANDED)
    assert admission is not None
    _carry(admission, landed=False)
    assert _leased() == set() and breaker._AHEAD.get() is None
    with CaptureQueriesContext(connection) as admitted:
        ticket = admit("card")
    assert len(admitted.captured_queries) == 1 and isinstance(ticket, Ticket)


def test_an_admission_ahead_inside_a_rolled_back_transaction_took_nothing():
    """Carried by a transactional step's record, the admission stands only if that commits."""
    report(admit("card"), ok=True)
    admission = breaker.admission_ahead("card", None, LANDED)
    assert admission is not None
    with pytest.raises(RuntimeError), transaction.atomic():
        _carry(admission)
        assert len(_leased()) == 1
        raise RuntimeError("the step's transaction rolls back")
    assert _leased() == set() and breaker._AHEAD.get() is None


def test_an_admission_ahead_no_call_used_gives_its_slot_back():
    """A saga that did not go on into the admitted step (a cancel honoured at the boundary, a
    task stopping) leaves no slot taken: the task's end gives it back, and so does an admit()
    for another call, which then asks for its own."""
    report(admit("card"), ok=True)
    admission = breaker.admission_ahead("card", None, LANDED)
    assert admission is not None
    _carry(admission)
    assert len(_leased()) == 1
    breaker.drop_ahead()
    assert _leased() == set() and breaker._AHEAD.get() is None

    admission = breaker.admission_ahead("card", None, LANDED)
    assert admission is not None
    _carry(admission)
    assert len(_leased()) == 1
    ticket = admit("card", 60.0)  # another step's call (another timeout): its own admission
    assert isinstance(ticket, Ticket) and _leased() == {ticket.slot_id}  # one, not two
    assert breaker._AHEAD.get() is None
    report(ticket, ok=True)
    assert _leased() == set()


def test_an_admission_ahead_of_a_breaker_not_closed_takes_no_slot_and_parks_the_call():
    """The breaker's row read ahead says open: no slot was taken with it, and admit() decides
    from it as from its own read (no canary while a person holds it open: a wait)."""
    report(admit("card"), ok=True)
    Breaker.objects.filter(provider="card").update(state=BreakerState.OPEN, forced=True)
    admission = breaker.admission_ahead("card", None, LANDED)
    assert admission is not None
    _carry(admission)
    assert _leased() == set()
    with CaptureQueriesContext(connection) as admitted:
        wait = admit("card")
    assert isinstance(wait, breaker.Wait) and wait.reason == BreakerState.OPEN
    assert admitted.captured_queries == [] and breaker._AHEAD.get() is None


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
