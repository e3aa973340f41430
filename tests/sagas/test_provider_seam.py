"""The engine's provider seam, driven in-process: parks give back the claim's attempt.

Like the engine model test, the engine runs here with the real claim and record code on
PostgreSQL, and the test delivers every message itself (one step per delivery:
``SAGA_INLINE_BUDGET`` is 0), so each assertion sees exactly one claim and one record. The
step ``s2`` of ``test_provider`` calls the provider ``card``; the real-worker proof with the
order saga is ``tests/orders/test_provider_outage.py``.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import connection
from django.db.models import F
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from providers import breaker
from providers.models import Breaker, CallSlot, HealthBucket
from sagas.models import Saga, SagaEvent, SagaState, SagaStep
from sagas.services import saga_request_cancel, saga_start
from tests.sagas.inprocess import deliver, lost_claim, one_step_per_delivery
from tests.sagas.sagatypes import effects

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _setup(settings):
    settings.SAGA_MAX_ATTEMPTS = 2
    one_step_per_delivery(
        settings, {"card": {"min_calls": 2, "failure_rate": 0.5, "cooldown": 60, "canaries": 1}}
    )


def _parks(saga_id) -> int:
    return SagaEvent.objects.filter(saga_id=saga_id, kind="parked").count()


def _step(saga_id, name: str) -> SagaStep:
    return SagaStep.objects.get(saga_id=saga_id, name=name)


def _generation() -> int:
    return Breaker.objects.get(provider="card").generation


def test_a_parked_forward_step_spends_no_attempt_however_often_it_is_claimed():
    breaker.force("card", "open", user=None)
    saga = saga_start(saga_type="test_provider", data={"script": {}})
    saga = deliver(saga.id)  # s1
    for _ in range(5):  # more claims than SAGA_MAX_ATTEMPTS, all while the breaker is open
        saga = deliver(saga.id)
        assert (saga.current_step, saga.attempt, saga.parked_on) == ("s2", 0, "card")
        assert saga.state == SagaState.RUNNING and saga.next_attempt_at > timezone.now()
    assert ("s2", "do") not in effects(saga.id)
    assert _parks(saga.id) == 1  # one timeline event per stay, not one per probe

    breaker.force("card", "closed", user=None)
    saga = deliver(saga.id)
    assert saga.current_step == "s3" and saga.parked_on == ""
    assert _step(saga.id, "s2").attempts == 1  # the one real call
    saga = deliver(saga.id)
    assert saga.state == SagaState.SUCCEEDED


def test_a_compensation_aimed_at_an_open_provider_waits_like_a_forward_call():
    saga = saga_start(saga_type="test_provider", data={"script": {"s3": ["business:no"]}})
    for _ in range(2):  # s1, s2
        saga = deliver(saga.id)
    breaker.force("card", "open", user=None)
    saga = deliver(saga.id)  # s3 says no: compensation begins with the undo of s2
    for _ in range(12):  # more claims than SAGA_COMPENSATION_MAX_ATTEMPTS
        saga = deliver(saga.id)
        assert (saga.state, saga.current_step, saga.attempt) == ("compensating", "s2", 0)
    assert ("s2", "undo") not in effects(saga.id)
    breaker.force("card", "closed", user=None)
    for _ in range(2):  # undo s2, undo s1
        saga = deliver(saga.id)
    assert saga.state == SagaState.COMPENSATED
    assert effects(saga.id)[("s2", "undo")] == 1


def test_a_deadline_still_holds_for_a_parked_saga():
    breaker.force("card", "open", user=None)
    saga = saga_start(saga_type="test_provider", data={"script": {}})
    saga = deliver(saga.id)
    saga = deliver(saga.id)
    assert saga.parked_on == "card"
    Saga.objects.filter(pk=saga.id).update(deadline_at=timezone.now() - timedelta(seconds=1))
    saga = deliver(saga.id)
    assert saga.state == SagaState.COMPENSATING and saga.failure_code == "timed_out"


def test_last_attempt_failing_as_the_breaker_opens_is_kept_for_after_the_outage():
    """The last attempt is kept while the provider is down, however many canary rounds the
    saga fails in (a canary probes for the breaker, it spends nothing); once the provider is
    back for everyone else, a call that still fails is the request's own, and it gives up."""
    saga = saga_start(saga_type="test_provider", data={"script": {"s2": ["transient"]}})
    saga = deliver(saga.id)  # s1
    saga = deliver(saga.id)  # s2, attempt 1 fails: one call in the window, breaker closed
    assert Breaker.objects.get(provider="card").state == "closed"
    saga = deliver(saga.id)  # attempt 2 (the last) fails and opens the breaker
    assert Breaker.objects.get(provider="card").state == "open"
    # Not compensated: it waits for the provider, with its last attempt given back.
    assert (saga.state, saga.attempt, saga.parked_on) == ("running", 1, "card")

    for _ in range(4):  # cool-downs over: each time it is the canary, and fails again
        Breaker.objects.filter(provider="card").update(probe_at=timezone.now())
        saga = deliver(saga.id)
        assert (saga.state, saga.attempt, saga.parked_on) == ("running", 1, "card")
        assert Breaker.objects.get(provider="card").state == "open"
    # The row keeps the count as the park left it: the last attempt given back, kept for later.
    assert _step(saga.id, "s2").attempts == 1

    # Other traffic found the provider back (the breaker closed): the kept attempt fails on
    # its own. Once only: now it compensates.
    breaker.force("card", "closed", user=None)
    saga = deliver(saga.id)
    assert saga.state == SagaState.COMPENSATING and saga.failure_code == "step_failed"


def _outage_begins(
    settings, *, others_failed: int, others_ok: int = 0, ok_before_outage: int = 0
) -> Saga:
    """A saga's attempt 1 at ``s2`` fails with the provider's window full of earlier successes
    (20 s ago); then other sagas' calls fail (``others_failed``) or go through (``others_ok``)
    before its last attempt, which fails too. ``ok_before_outage``: attempt 1 was 10 s ago, and
    that many of others' calls went through 5 s ago, before the outage began. ``min_calls``
    10: the breaker cannot open on these few failures, as at low traffic, when an outage is a
    second old."""
    settings.SAGA_PROVIDERS = {
        "card": {"min_calls": 10, "failure_rate": 0.5, "cooldown": 60, "canaries": 1}
    }
    breaker.ensure_breaker("card")
    generation = Breaker.objects.get(provider="card").generation
    now = int(timezone.now().timestamp())

    def bucket(second: int, ok: int) -> None:
        HealthBucket.objects.create(
            provider="card", generation=generation, second=second, ok=ok, failed=0, started=ok
        )

    bucket(now - 20, 12)
    saga = saga_start(saga_type="test_provider", data={"script": {"s2": ["transient"] * 2}})
    saga = deliver(saga.id)  # s1
    saga = deliver(saga.id)  # s2, attempt 1 fails
    if ok_before_outage:
        HealthBucket.objects.filter(provider="card", second__gte=now - 2).update(
            second=F("second") - 10
        )
        SagaStep.objects.filter(saga_id=saga.id).update(
            updated_at=F("updated_at") - timedelta(seconds=10)
        )
        bucket(now - 5, ok_before_outage)
    for ok in [False] * others_failed + [True] * others_ok:
        breaker.report(breaker.admit("card"), ok=ok)
    saga = deliver(saga.id)  # attempt 2, the last, fails
    assert Breaker.objects.get(provider="card").state == "closed"  # too few failures to open
    return saga


def test_last_attempt_failing_as_an_outage_begins_is_kept_though_the_breaker_is_still_closed(
    settings,
):
    """The window's earlier successes and ``min_calls`` keep the breaker closed for a moment
    after an outage begins; a saga whose last attempt fails in that moment, as everyone else's
    calls do, waits a cool-down and tries once more instead of being cancelled for the outage
    (a chaos run lost an order so, 0.35 s before the breaker opened)."""
    saga = _outage_begins(settings, others_failed=2)
    assert (saga.state, saga.attempt, saga.parked_on) == ("running", 1, "card")
    assert saga.next_attempt_at > timezone.now() + timedelta(seconds=59)  # the cool-down
    parked = SagaEvent.objects.get(saga_id=saga.id, kind="parked")
    assert "provider card: failing" in parked.detail

    Saga.objects.filter(pk=saga.id).update(data={"script": {}})  # the provider is back
    saga = deliver(saga.id)  # the kept attempt goes through
    assert (saga.current_step, saga.parked_on) == ("s3", "")
    assert effects(saga.id)[("s2", "do")] == 1
    step = _step(saga.id, "s2")  # the stay's holds forgotten: the step's undo counts afresh
    assert (step.held_generation, step.held_times) == (None, None)


def test_last_attempt_held_once_on_others_failures_though_a_call_was_answered_since(settings):
    """Others' calls failing, then one answered, then the saga's last attempt failing: the
    provider answered someone since, but its most recent calls fail at its failure rate (an
    outage beginning, a lucky call in it). Held back once in the generation: failing again
    after another call was answered, it gives up."""
    saga = _outage_begins(settings, others_failed=2, others_ok=1)
    assert breaker.failures_in_a_row("card", _generation(), breaker.provider_config("card")) == 1
    assert (saga.state, saga.attempt, saga.parked_on) == ("running", 1, "card")
    assert _step(saga.id, "s2").held_times == 1
    breaker.report(breaker.admit("card"), ok=True)
    saga = deliver(saga.id)
    assert (saga.state, saga.failure_code) == ("compensating", "step_failed")


def test_last_attempt_kept_when_the_outage_began_after_the_previous_attempt(settings):
    """The saga's previous attempt failed before the outage, on an ordinary fault, and others'
    calls went through after it; then the outage began. Its most recent calls are failing:
    the last attempt is kept (a chaos run lost an order so, its attempts 1-4 spent in the
    second before the outage, the last 6.6 s later on it, 0.4 s before the breaker opened)."""
    saga = _outage_begins(settings, others_failed=2, ok_before_outage=6)
    assert (saga.state, saga.attempt, saga.parked_on) == ("running", 1, "card")


def test_a_kept_last_attempt_that_fails_again_after_others_were_answered_gives_up(settings):
    """Once only while the provider answers others: still failing after the cool-down with
    the breaker closed, and others' calls going through meanwhile, the failure is the
    request's own."""
    saga = _outage_begins(settings, others_failed=2)
    assert saga.parked_on == "card"
    for _ in range(3):
        breaker.report(breaker.admit("card"), ok=True)
    saga = deliver(saga.id)
    assert (saga.state, saga.failure_code, saga.parked_on) == ("compensating", "step_failed", "")
    assert _step(saga.id, "s2").attempts == 2


def test_a_kept_last_attempt_is_held_again_while_the_provider_answers_nobody(settings):
    """Still failing after the cool-down, with no call answered since (others' failures and
    its own in a row, too few yet for the breaker): an outage still, held back again, its
    step row counting the holds."""
    saga = _outage_begins(settings, others_failed=2)
    assert _step(saga.id, "s2").held_times == 1
    saga = deliver(saga.id)
    assert Breaker.objects.get(provider="card").state == "closed"
    assert (saga.state, saga.attempt, saga.parked_on) == ("running", 1, "card")
    assert _step(saga.id, "s2").held_times == 2


def test_last_attempt_failing_while_other_calls_go_through_is_the_requests_own(settings):
    """Others' calls mostly succeed after the saga's failures (3 failed of 7 with its own two,
    the successes last): the provider is up, and the saga compensates as usual."""
    saga = _outage_begins(settings, others_failed=1, others_ok=4)
    assert (saga.state, saga.failure_code, saga.parked_on) == ("compensating", "step_failed", "")


def test_a_failure_after_an_answered_call_holds_nothing_back(settings):
    """A saga failing on its own request, another saga's call answered between its two
    attempts and no other failing: its last failure follows a success, the provider is up,
    and the saga compensates after its attempts as usual."""
    saga = _outage_begins(settings, others_failed=0, others_ok=1)
    assert (saga.state, saga.failure_code, saga.parked_on) == ("compensating", "step_failed", "")


def test_a_saga_failing_alone_is_held_back_until_its_failures_in_a_row_open_the_breaker(
    settings,
):
    """Five attempts of one saga, all failing on a quiet provider that answers nobody: its
    own request at fault or an outage only it has met, nothing here tells them apart. It is
    held back a cool-down at a time, each try lengthening the row, until ``min_calls`` in a
    row open the breaker; then it waits on the breaker like any saga."""
    settings.SAGA_MAX_ATTEMPTS = 5
    settings.SAGA_PROVIDERS = {
        "card": {"min_calls": 10, "failure_rate": 0.5, "cooldown": 60, "canaries": 1}
    }
    saga = saga_start(saga_type="test_provider", data={"script": {"s2": ["transient"] * 20}})
    saga = deliver(saga.id)  # s1
    for _ in range(5):
        saga = deliver(saga.id)
    assert Breaker.objects.get(provider="card").state == "closed"
    assert (saga.state, saga.attempt, saga.parked_on) == ("running", 4, "card")
    for held in range(2, 6):  # rows of 6 to 9: closed, held back again
        saga = deliver(saga.id)
        assert Breaker.objects.get(provider="card").state == "closed"
        assert (saga.state, saga.parked_on, _step(saga.id, "s2").held_times) == (
            "running",
            "card",
            held,
        )
    saga = deliver(saga.id)  # the tenth failure in a row opens the breaker
    assert Breaker.objects.get(provider="card").state == "open"
    assert (saga.state, saga.attempt, saga.parked_on) == ("running", 4, "card")
    assert SagaEvent.objects.filter(saga_id=saga.id, kind="step_failed").count() == 0


def test_a_sagas_min_calls_th_hold_with_nobody_answered_opens_the_breaker(settings):
    """A lone caller's tries come a cool-down apart, and the window may never hold
    ``min_calls`` of its failures at once (the defaults: 10 cool-downs of 10 s or more, a 30 s
    window). Its ``min_calls``-th hold in a generation, the provider still answering nobody,
    opens the breaker, and the saga waits on it as for any outage; with a call answered since,
    it gives up instead. The next generation counts afresh."""
    settings.SAGA_PROVIDERS = {"card": {"min_calls": 10, "cooldown": 60}}
    breaker.ensure_breaker("card")
    generation = _generation()
    for _ in range(3):
        breaker.report(breaker.admit("card"), ok=False)
    wait = breaker.held_back("card", generation=generation, kept_before=lambda g: 9)
    assert wait is not None and (wait.reason, wait.holds) == ("failing", 10)
    assert Breaker.objects.get(provider="card").state == "closed"
    wait = breaker.held_back("card", generation=generation, kept_before=lambda g: 10)
    assert wait is not None and wait.reason == "open" and wait.delay >= 60
    assert Breaker.objects.get(provider="card").state == "open"

    breaker.force("card", "closed", user=None)
    new = _generation()
    breaker.report(breaker.admit("card"), ok=True)  # answered: the provider is up
    breaker.report(breaker.admit("card"), ok=False)
    assert breaker.held_back("card", generation=new, kept_before=lambda g: 10) is None
    assert Breaker.objects.get(provider="card").state == "closed"

    def kept_before(g: int) -> int:
        return 10 if g == generation else 0

    for _ in range(2):  # down again, in the new generation
        breaker.report(breaker.admit("card"), ok=False)
    wait = breaker.held_back("card", generation=new, kept_before=kept_before)
    assert wait is not None and (wait.reason, wait.holds) == ("failing", 1)


def _five_attempts_after_a_busy_spell(settings) -> None:
    """Five attempts per step, the breaker's ``min_calls`` at five too (as in the chaos run),
    and 40 calls answered 10 s ago."""
    settings.SAGA_MAX_ATTEMPTS = 5
    settings.SAGA_PROVIDERS = {
        "card": {"min_calls": 5, "failure_rate": 0.5, "cooldown": 60, "canaries": 1}
    }
    breaker.ensure_breaker("card")
    now = int(timezone.now().timestamp())
    HealthBucket.objects.create(
        provider="card", generation=_generation(), second=now - 10, ok=40, started=40
    )


def test_last_attempts_on_an_outage_nobody_else_met_are_held_until_the_breaker_opens(settings):
    """A saga's first attempts fail on ordinary faults among others' successes; then the
    provider goes down with the saga its only caller, and its last three attempts fail on
    the outage: three in a row with ``min_calls`` 5, the breaker closed, and no other caller
    failing. It is held back, tries again a cool-down later and is held again, until its
    failures in a row open the breaker, on which it parks (it was cancelled for step_failed,
    a chaos run's order, the breaker two failures short of opening)."""
    _five_attempts_after_a_busy_spell(settings)
    saga = saga_start(saga_type="test_provider", data={"script": {"s2": ["transient"] * 9}})
    saga = deliver(saga.id)  # s1
    for _ in range(2):  # attempts 1 and 2 fail, others' calls answered after each
        saga = deliver(saga.id)
        for _ in range(5):
            breaker.report(breaker.admit("card"), ok=True)
    for attempt in (3, 4):  # the outage: attempts 3 and 4 fail
        saga = deliver(saga.id)
        assert (saga.state, saga.attempt) == ("running", attempt)
    saga = deliver(saga.id)  # attempt 5, the last: three in a row, held back
    assert Breaker.objects.get(provider="card").state == "closed"
    assert (saga.state, saga.attempt, saga.parked_on) == ("running", 4, "card")
    saga = deliver(saga.id)  # four in a row: held again
    assert Breaker.objects.get(provider="card").state == "closed"
    assert (saga.state, saga.parked_on) == ("running", "card")
    saga = deliver(saga.id)  # five: the breaker opens, and the saga waits on it
    assert Breaker.objects.get(provider="card").state == "open"
    assert (saga.state, saga.attempt, saga.parked_on) == ("running", 4, "card")
    assert SagaEvent.objects.filter(saga_id=saga.id, kind="step_failed").count() == 0


def test_a_sagas_failures_spread_over_seconds_open_the_breaker_before_its_last_is_spent(
    settings,
):
    """A provider goes down while one saga is its only caller, just after a busy spell; the
    saga's five attempts come a few seconds apart (backed off, or delayed by a broker outage
    at the same moment). With ``min_calls`` at the attempts, its own failures open the breaker
    by its last attempt, which parks instead of cancelling the order for the outage (counted
    only within two seconds, the failures were too few and it was cancelled for step_failed)."""
    _five_attempts_after_a_busy_spell(settings)
    saga = saga_start(saga_type="test_provider", data={"script": {"s2": ["transient"] * 9}})
    saga = deliver(saga.id)  # s1
    for attempt in range(1, 5):
        saga = deliver(saga.id)  # s2 fails; then 3 s pass before the next attempt
        assert (saga.state, saga.attempt) == ("running", attempt)
        # Every bucket 3 s older (through negatives: buckets 3 s apart never collide).
        HealthBucket.objects.filter(provider="card").update(second=-F("second"))
        HealthBucket.objects.filter(provider="card").update(second=-F("second") - 3)
    assert Breaker.objects.get(provider="card").state == "closed"  # 4 of 44 in the window
    saga = deliver(saga.id)  # attempt 5, the last: five failures in a row open the breaker
    assert Breaker.objects.get(provider="card").state == "open"
    assert (saga.state, saga.attempt, saga.parked_on) == ("running", 4, "card")
    assert "provider card: open" in SagaEvent.objects.get(saga_id=saga.id, kind="parked").detail


def test_a_call_that_outlived_an_outage_is_kept_once_after_the_breaker_closed_again(settings):
    """A last attempt admitted before the breaker opened, whose call ran on while the breaker
    opened and closed again (a hanging call, or a person closing it), then failed: it went on
    the outage, so the saga waits a cool-down and tries once more instead of being cancelled
    for it. Within the bound a closed breaker's holds have (``min_calls`` in the call's
    generation)."""
    settings.SAGA_PROVIDERS = {"card": {"min_calls": 10, "cooldown": 60}}
    breaker.ensure_breaker("card")
    old = Breaker.objects.get(provider="card").generation
    breaker.force("card", "open", user=None)
    breaker.force("card", "closed", user=None)
    assert Breaker.objects.get(provider="card").generation != old
    wait = breaker.held_back("card", generation=old)
    assert wait is not None and wait.reason == "failing" and wait.delay >= 60
    wait = breaker.held_back("card", generation=old, kept_before=lambda g: int(g == old))
    assert wait is not None and wait.holds == 2  # held once in it already, by its row
    assert breaker.held_back("card", generation=old, kept_before=lambda g: 10) is None


def test_a_saga_that_only_queued_for_a_call_slot_still_has_its_last_attempt_kept(settings):
    """Waiting a moment for a free call slot is no stay on the provider: the saga's last
    attempt, failing as the breaker opens, is kept for after the outage. Taken for a stay, the
    slot wait made the last attempt count as kept already, and the saga was cancelled for the
    outage while the breaker was open."""
    settings.SAGA_PROVIDERS = {
        "card": {"min_calls": 2, "failure_rate": 0.5, "cooldown": 60, "canaries": 1}
        | {"max_in_flight": 1}
    }
    saga = saga_start(saga_type="test_provider", data={"script": {"s2": ["transient"] * 2}})
    saga = deliver(saga.id)  # s1
    saga = deliver(saga.id)  # s2, attempt 1 fails: one failure, the breaker stays closed
    held = breaker.admit("card")  # another saga's call holds the one slot
    assert isinstance(held, breaker.Ticket)
    saga = deliver(saga.id)  # no slot free: a moment's wait, its attempt given back
    assert (saga.state, saga.attempt, saga.parked_on) == ("running", 1, "")
    assert _parks(saga.id) == 0
    breaker.report(held, ok=True)
    saga = deliver(saga.id)  # attempt 2, the last, fails and opens the breaker
    assert Breaker.objects.get(provider="card").state == "open"
    assert (saga.state, saga.attempt, saga.parked_on) == ("running", 1, "card")


def test_a_saga_woken_after_an_outage_whose_call_fails_as_it_begins_again_is_kept(settings):
    """Parked through an outage, woken when the breaker closed: its last attempt fails as the
    provider goes down again, before the breaker has seen enough failures to re-open (others'
    calls failing too). An outage again, a new generation of the breaker: held back once more,
    as a saga that never parked would be. Failing again in it while others' calls go through,
    it gives up."""
    settings.SAGA_PROVIDERS = {
        "card": {"min_calls": 10, "failure_rate": 0.5, "cooldown": 60, "canaries": 1}
    }
    saga = saga_start(saga_type="test_provider", data={"script": {"s2": ["transient"] * 9}})
    saga = deliver(saga.id)  # s1
    saga = deliver(saga.id)  # s2, attempt 1 fails
    breaker.force("card", "open", user=None)
    saga = deliver(saga.id)  # parks at the open gate
    assert (saga.attempt, saga.parked_on) == (1, "card")
    breaker.force("card", "closed", user=None)  # back (a new generation) ...
    for _ in range(3):  # (within the second of its attempts, so both count as its own)
        breaker.report(breaker.admit("card"), ok=False)  # ... and failing again for others
    saga = deliver(saga.id)  # attempt 2, the last, fails; the breaker is still closed
    assert Breaker.objects.get(provider="card").state == "closed"
    assert (saga.state, saga.attempt, saga.parked_on) == ("running", 1, "card")
    breaker.report(breaker.admit("card"), ok=True)  # another saga's call goes through
    saga = deliver(saga.id)  # the kept attempt fails again in the same generation
    assert (saga.state, saga.failure_code) == ("compensating", "step_failed")


def test_a_kept_saga_whose_call_fails_as_the_provider_goes_down_again_is_kept_again():
    """Kept through one outage, woken when the breaker closed, its call fails as the provider
    goes down again and the breaker re-opens: an outage again, so it waits again instead of
    being cancelled for the second one (a flapping provider)."""
    saga = saga_start(saga_type="test_provider", data={"script": {"s2": ["transient"] * 9}})
    for _ in range(3):  # s1; s2 attempt 1; attempt 2, the last, opens the breaker: kept
        saga = deliver(saga.id)
    assert (saga.state, saga.parked_on) == ("running", "card")
    breaker.force("card", "closed", user=None)  # back for everyone (a new generation)
    breaker.report(breaker.admit("card"), ok=False)  # and down again: another saga's call
    saga = deliver(saga.id)  # its call fails too, and the breaker re-opens on it
    assert Breaker.objects.get(provider="card").state == "open"
    assert (saga.state, saga.attempt, saga.parked_on) == ("running", 1, "card")


def test_a_saga_picked_as_canary_round_after_round_spends_no_attempt():
    """A long outage: a saga that never called before the breaker opened is a canary in
    every round and fails each time; it never spends an attempt, so it is never cancelled
    for the outage, and it goes on once a canary gets through."""
    breaker.force("card", "closed", user=None)  # the breaker's row; then open, not forced
    Breaker.objects.filter(provider="card").update(state="open", probe_at=timezone.now())
    saga = saga_start(saga_type="test_provider", data={"script": {"s2": ["transient"] * 9}})
    saga = deliver(saga.id)  # s1 (no provider)
    for _ in range(6):  # more rounds than SAGA_MAX_ATTEMPTS
        Breaker.objects.filter(provider="card").update(probe_at=timezone.now())
        saga = deliver(saga.id)  # the round's canary: it calls, and the call fails
        assert (saga.state, saga.current_step, saga.attempt) == ("running", "s2", 0)
        assert saga.parked_on == "card"
    assert ("s2", "do") not in effects(saga.id)

    Saga.objects.filter(pk=saga.id).update(data={"script": {}})  # the provider is back
    Breaker.objects.filter(provider="card").update(probe_at=timezone.now())
    saga = deliver(saga.id)  # the canary gets through: the breaker closes, the saga goes on
    assert (saga.current_step, saga.parked_on) == ("s3", "")
    assert Breaker.objects.get(provider="card").state == "closed"
    assert effects(saga.id)[("s2", "do")] == 1


def test_an_error_the_provider_answered_with_is_retried_but_counts_as_a_healthy_call():
    """``pm_card_refund_fails``' voids keep failing because the provider refuses them, not
    because it is down: they must not open the breaker and park everyone else's payments."""
    from payments.errors import ProviderRefusedUndo, ProviderUnavailable
    from sagas.provider_seam import call_step

    def refused(ctx):
        raise ProviderRefusedUndo("void of auth_x failed (test card)")

    def unreachable(ctx):
        raise ProviderUnavailable("connect timeout")

    for _ in range(3):
        with pytest.raises(ProviderUnavailable):  # transient all the same: retried
            call_step(refused, None, breaker.admit("card"))
    assert breaker.window_counts("card") == (3, 0)
    assert Breaker.objects.get(provider="card").state == "closed"
    for _ in range(2):
        with pytest.raises(ProviderUnavailable):
            call_step(unreachable, None, breaker.admit("card"))
    # Two calls unanswered in a row (min_calls 2), after the three answered: the breaker opens.
    assert breaker.window_counts("card") == (5, 2)
    assert Breaker.objects.get(provider="card").state == "open"


def test_a_programming_error_still_counts_as_a_failed_call():
    """Unlike a bad row, a missing table or a revoked grant fails every call alike: that is
    the provider (our database, for a participant living in it) being unusable."""
    from django.db import ProgrammingError

    from sagas.provider_seam import call_step

    def missing_table(ctx):
        raise ProgrammingError('relation "inventory_product" does not exist')

    for _ in range(2):
        with pytest.raises(ProgrammingError):
            call_step(missing_table, None, breaker.admit("card"))
    assert breaker.window_counts("card") == (2, 2)
    assert Breaker.objects.get(provider="card").state == "open"


def test_data_the_database_refuses_is_retried_but_opens_no_breaker():
    """A step that keeps hitting a constraint (one bad row) spends its attempts and
    compensates, as any step that keeps failing does; the provider stays available to every
    other saga: counted as failures, these two calls would have opened the breaker."""
    saga = saga_start(saga_type="test_provider", data={"script": {"s2": ["integrity"] * 3}})
    saga = deliver(saga.id)  # s1
    for _ in range(2):  # SAGA_MAX_ATTEMPTS
        saga = deliver(saga.id)
    assert (saga.state, saga.failure_code, saga.parked_on) == ("compensating", "step_failed", "")
    assert "IntegrityError" in _step(saga.id, "s2").last_error
    saga = deliver(saga.id)  # the undo of s2
    assert effects(saga.id)[("s2", "undo")] == 1  # not parked: the undo went through
    assert breaker.window_counts("card") == (3, 0)  # two attempts and the undo, all healthy
    assert Breaker.objects.get(provider="card").state == "closed"
    other = saga_start(saga_type="test_provider", data={"script": {}})
    for _ in range(3):
        other = deliver(other.id)
    assert other.state == SagaState.SUCCEEDED  # never parked


def test_a_healthy_calls_outcome_rides_in_the_record_of_its_step():
    """The call slot's release and the health count of a call that answered are part of the
    step's record statement: one round trip fewer per provider call, the same bookkeeping."""
    saga = saga_start(saga_type="test_provider", data={"script": {}})
    saga = deliver(saga.id)  # s1
    with CaptureQueriesContext(connection) as captured:
        saga = deliver(saga.id)  # s2 calls card
    assert saga.current_step == "s3"
    counts = [q["sql"] for q in captured if 'INSERT INTO "providers_healthbucket"' in q["sql"]]
    assert len(counts) == 1, counts
    assert 'UPDATE "sagas_saga"' in counts[0]  # carried by the record, not a statement of its own
    assert breaker.window_counts("card") == (1, 0)
    assert not CallSlot.objects.filter(provider="card", lease_until__isnull=False).exists()
    assert CallSlot.objects.filter(provider="card").exists()  # a slot was taken, and given back


def _parked_on_card(script: dict | None = None) -> Saga:
    saga = saga_start(saga_type="test_provider", data={"script": script or {}})
    saga = deliver(saga.id)  # s1
    saga = deliver(saga.id)  # s2 meets the open breaker
    assert saga.parked_on == "card"
    return saga


def _due_in(saga: Saga) -> float:
    return (saga.next_attempt_at - timezone.now()).total_seconds()


def _parked_ago(saga: Saga, seconds: float) -> None:
    SagaEvent.objects.filter(saga_id=saga.id, kind="parked").update(
        at=timezone.now() - timedelta(seconds=seconds)
    )


def test_by_default_a_parked_saga_looks_again_at_every_probe(settings):
    settings.SAGA_PROVIDERS = {"card": {"cooldown": 1, "release_spread": 0.05}}
    breaker.force("card", "open", user=None)
    saga = _parked_on_card()
    _parked_ago(saga, 100)
    saga = deliver(saga.id)
    assert saga.parked_on == "card" and _due_in(saga) < 2  # the next probe, not 100 s on


def test_a_saga_parked_for_longer_looks_again_less_often_up_to_park_max(settings):
    settings.SAGA_PROVIDERS = {
        "card": {"cooldown": 1, "release_spread": 0.05, "park_max": 300},
    }
    breaker.force("card", "open", user=None)
    saga = _parked_on_card()
    assert _due_in(saga) < 2  # the first look: at the breaker's own cool-down

    _parked_ago(saga, 100)
    saga = deliver(saga.id)  # still open: about as long again as it has waited
    assert saga.parked_on == "card" and 99 < _due_in(saga) <= 126
    _parked_ago(saga, 5000)
    saga = deliver(saga.id)
    assert 299 < _due_in(saga) <= 300  # never more than park_max
    assert _parks(saga.id) == 1 and saga.attempt == 0


def test_a_closing_breaker_rings_the_sagas_parked_on_it(django_capture_on_commit_callbacks):
    breaker.force("card", "open", user=None)
    parked = [_parked_on_card() for _ in range(2)]
    # One parked saga is being worked on right now (a live lease): it is left alone.
    busy = _parked_on_card()
    Saga.objects.filter(pk=busy.pk).update(lease_until=timezone.now() + timedelta(seconds=30))
    elsewhere = saga_start(saga_type="test_provider", data={"script": {}})
    later = timezone.now() + timedelta(seconds=3600)
    Saga.objects.filter(pk=elsewhere.pk).update(next_attempt_at=later)
    for saga in parked:
        assert _due_in(Saga.objects.get(pk=saga.pk)) > 10  # at the 60 s cool-down

    with django_capture_on_commit_callbacks() as announced:
        breaker.force("card", "closed", user=None)
    assert len(announced) == 1  # the breaker_closed announcement, once committed
    with django_capture_on_commit_callbacks() as rings:
        announced[0]()
    assert len(rings) == 1  # one batch of doorbells, after the re-arm commits

    for saga in parked:
        # Due within the provider's release_spread (5 s by default), not at the cool-down.
        assert _due_in(Saga.objects.get(pk=saga.pk)) <= 5.0
    assert _due_in(Saga.objects.get(pk=busy.pk)) > 10
    assert Saga.objects.get(pk=elsewhere.pk).next_attempt_at == later
    saga = deliver(parked[0].id)  # woken: the call goes through
    assert saga.current_step == "s3" and saga.parked_on == ""


def test_a_canarys_call_that_may_have_taken_effect_is_undone_when_the_saga_is_cancelled():
    """The canary's call timed out after taking effect and the park gave its attempt back, so
    the saga's attempt counter says the step never ran: a cancel must still undo it, from
    what the step's row recorded (the attempt may have taken effect), not from the counter."""
    breaker.force("card", "closed", user=None)
    Breaker.objects.filter(provider="card").update(state="open", probe_at=timezone.now())
    saga = saga_start(saga_type="test_provider", data={"script": {"s2": ["lost"]}})
    saga = deliver(saga.id)  # s1
    saga = deliver(saga.id)  # s2 as the round's canary: it takes effect, then times out
    assert (saga.current_step, saga.attempt, saga.parked_on) == ("s2", 0, "card")
    assert effects(saga.id)[("s2", "do")] == 1 and _step(saga.id, "s2").maybe_effect

    saga_request_cancel(saga_id=saga.id, reason="customer_cancelled", actor="test")
    breaker.force("card", "closed", user=None)
    for _ in range(3):  # the cancel honoured, undo s2, undo s1
        saga = deliver(saga.id)
    assert saga.state == SagaState.COMPENSATED
    assert effects(saga.id)[("s2", "undo")] == 1 and effects(saga.id)[("s1", "undo")] == 1


def test_a_run_with_no_record_after_a_refused_canary_counts():
    """The canary's call was refused (nothing happened) and its park gave the claim back; the
    next run left no record (its worker died): a cancel must undo the step."""
    breaker.force("card", "closed", user=None)
    Breaker.objects.filter(provider="card").update(state="open", probe_at=timezone.now())
    saga = saga_start(saga_type="test_provider", data={"script": {"s2": ["refused"]}})
    saga = deliver(saga.id)  # s1
    saga = deliver(saga.id)  # s2 as the canary: refused, parked, its claim given back
    assert (saga.current_step, saga.attempt, saga.parked_on) == ("s2", 0, "card")
    assert not _step(saga.id, "s2").maybe_effect
    breaker.force("card", "closed", user=None)
    lost_claim(saga.id)  # a run whose worker dies: no record
    saga_request_cancel(saga_id=saga.id, reason="customer_cancelled", actor="test")
    for _ in range(3):  # the cancel honoured, undo s2, undo s1
        saga = deliver(saga.id)
    assert saga.state == SagaState.COMPENSATED
    assert effects(saga.id)[("s2", "undo")] == 1


def test_a_pivot_canary_that_may_have_taken_effect_is_not_cancelled_past():
    """A pivot whose canary call timed out after taking effect was given its claim back: a
    passed deadline must not compensate the steps before it, the pivot may have run."""
    breaker.force("card", "closed", user=None)
    Breaker.objects.filter(provider="card").update(state="open", probe_at=timezone.now())
    saga = saga_start(saga_type="test_provider_pivot", data={"script": {"s2": ["lost"]}})
    saga = deliver(saga.id)  # s1
    saga = deliver(saga.id)  # the pivot s2 as the canary: took effect, timed out, parked
    assert (saga.current_step, saga.attempt, saga.parked_on) == ("s2", 0, "card")
    Saga.objects.filter(pk=saga.id).update(data={"script": {}})  # the provider answers again
    breaker.force("card", "closed", user=None)
    Saga.objects.filter(pk=saga.id).update(deadline_at=timezone.now() - timedelta(seconds=1))
    saga = deliver(saga.id)  # past the deadline, but the pivot goes on
    assert (saga.state, saga.current_step) == (SagaState.RUNNING, "s3")
    saga = deliver(saga.id)
    assert saga.state == SagaState.SUCCEEDED
    assert not any(kind == "undo" for _, kind in effects(saga.id))
