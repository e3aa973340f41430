"""The breaker and limits of one provider, driven directly through admit/report.

These run in the test process against PostgreSQL: the state is shared rows, so what one
process does here is what every worker sees. The end-to-end proof with real workers and the
order saga is ``tests/orders/test_provider_outage.py``.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.contrib.auth.models import Group, User
from django.core.management import call_command
from django.utils import timezone

from audit.models import AuditEntry
from providers import breaker, outage
from providers.breaker import Ticket, Wait, admit, report
from providers.models import Breaker, CallSlot, FakeProviderStatus
from sagas.faults import InjectedError, fault_point

pytestmark = pytest.mark.django_db

KNOBS = {
    "window": 30,
    "min_calls": 4,
    "failure_rate": 0.5,
    "cooldown": 0,
    "canaries": 2,
    "max_in_flight": 3,
    "release_spread": 0,
}


@pytest.fixture(autouse=True)
def knobs(settings):
    settings.SAGA_PROVIDERS = {"card": KNOBS}
    breaker._known_breakers.clear()
    breaker._known_slots.clear()


def _call(ok: bool) -> None:
    ticket = admit("card")
    assert isinstance(ticket, Ticket), ticket
    report(ticket, ok=ok)


def _state() -> str:
    return Breaker.objects.get(provider="card").state


def test_failure_rate_opens_only_after_the_minimum_number_of_calls():
    for _ in range(3):
        _call(ok=False)
    assert _state() == "closed"  # three failures are fewer than min_calls
    _call(ok=False)
    assert _state() == "open"


def test_failures_below_the_rate_keep_it_closed():
    for ok in (True, True, True, False, True, True, False):
        _call(ok=ok)
    assert _state() == "closed"


def test_business_failures_count_as_healthy_answers():
    from sagas.definition import BusinessFailure, StepContext
    from sagas.provider_seam import call_step as engine_call

    ctx = StepContext("s", "t", "step", 1, {}, {}, "k", "k")

    def declined(_ctx):
        raise BusinessFailure("payment_declined")

    for _ in range(6):
        with pytest.raises(BusinessFailure):
            engine_call(declined, ctx, admit("card"))
    assert _state() == "closed"
    assert breaker.window_counts("card") == (6, 0)


def test_open_parks_calls_then_canaries_close_it_or_open_it_again(settings):
    settings.SAGA_PROVIDERS = {"card": {**KNOBS, "cooldown": 60}}
    for _ in range(4):
        _call(ok=False)
    wait = admit("card")
    assert isinstance(wait, Wait) and wait.reason == "open" and wait.delay > 50

    # Cool-down over: two canaries go, the third caller waits for their verdict.
    Breaker.objects.filter(provider="card").update(probe_at=timezone.now())
    first, second = admit("card"), admit("card")
    assert first.canary and second.canary and _state() == "half_open"
    assert isinstance(admit("card"), Wait)
    report(first, ok=False)
    assert _state() == "open"  # one canary failing is enough
    report(second, ok=True)  # late success of the old round changes nothing
    assert _state() == "open"

    Breaker.objects.filter(provider="card").update(probe_at=timezone.now())
    first, second = admit("card"), admit("card")
    report(first, ok=True)
    assert _state() == "half_open"
    report(second, ok=True)
    assert _state() == "closed"
    # The failures from before the recovery do not count against the closed breaker.
    _call(ok=False)
    assert _state() == "closed"


def test_a_half_open_round_is_judged_by_the_failure_rate_not_by_one_canary(settings):
    """Three canaries at a failure rate of 0.5: one failing (a request that fails on its own,
    one transient error) does not re-open a provider whose other canaries answer; two close
    it. A provider still down fails two of them, and that re-opens it."""
    settings.SAGA_PROVIDERS = {"card": {**KNOBS, "cooldown": 60, "canaries": 3}}
    for _ in range(4):
        _call(ok=False)
    assert _state() == "open"

    Breaker.objects.filter(provider="card").update(probe_at=timezone.now())
    canaries = [admit("card") for _ in range(3)]
    assert all(t.canary for t in canaries) and isinstance(admit("card"), Wait)
    report(canaries[0], ok=False)
    assert _state() == "half_open"  # one of three failed: below the rate
    report(canaries[1], ok=True)
    assert _state() == "half_open"
    report(canaries[2], ok=True)
    assert _state() == "closed"

    for _ in range(4):
        _call(ok=False)
    Breaker.objects.filter(provider="card").update(probe_at=timezone.now())
    canaries = [admit("card") for _ in range(3)]
    report(canaries[0], ok=True)
    report(canaries[1], ok=False)
    assert _state() == "half_open"
    report(canaries[2], ok=False)
    assert _state() == "open"  # two of three failed: the rate is reached


@pytest.mark.parametrize(
    ("canaries", "rate", "verdicts"),
    [(1, 0.5, (1, 1)), (2, 0.5, (1, 2)), (3, 0.5, (2, 2)), (5, 0.5, (3, 3)), (3, 1.0, (3, 1)),
     (3, 0.1, (1, 3)), (4, 0.5, (2, 3))],
)  # fmt: skip
def test_canary_verdicts_follow_the_failure_rate(canaries, rate, verdicts):
    """(failures that re-open, successes that close) for a round of ``canaries`` calls."""
    from providers.config import ProviderConfig

    assert breaker.canary_verdicts(ProviderConfig(canaries=canaries, failure_rate=rate)) == verdicts


def test_in_flight_limit_and_a_lost_call_slot_comes_back_after_its_lease():
    tickets = [admit("card") for _ in range(3)]
    assert all(isinstance(t, Ticket) for t in tickets)
    wait = admit("card")
    assert isinstance(wait, Wait) and wait.reason == "in_flight"
    report(tickets[0], ok=True)
    assert isinstance(admit("card"), Ticket)
    # A worker SIGKILLed mid-call never reports: its slot is free once its lease has passed.
    CallSlot.objects.filter(provider="card", lease_until__isnull=False).update(
        lease_until=timezone.now() - timedelta(seconds=1)
    )
    assert isinstance(admit("card"), Ticket)


def test_a_call_slot_outlives_the_step_that_took_it(settings):
    """The slot's lease is the calling step's timeout + budget + 5 s: a carrier booking allowed
    60 s keeps its slot for the whole call (sized from the 30 s default it ran out at 35 s,
    and a second call could take the slot while the first still ran)."""
    settings.SAGA_STEP_TIMEOUT = 30.0
    settings.SAGA_INLINE_BUDGET = 2.0
    before = timezone.now()
    ticket = admit("card", 60.0)
    assert isinstance(ticket, Ticket) and ticket.slot_lease is not None
    assert ticket.slot_lease - before >= timedelta(seconds=67)
    assert CallSlot.objects.get(pk=ticket.slot_id).lease_until == ticket.slot_lease
    default = admit("card")  # a step with the default timeout
    assert isinstance(default, Ticket) and default.slot_lease is not None
    assert timedelta(seconds=37) <= default.slot_lease - before < timedelta(seconds=67)


def test_rate_limit_per_second(settings):
    settings.SAGA_PROVIDERS = {"card": {**KNOBS, "max_in_flight": 0, "rate": 2}}
    results = [admit("card") for _ in range(3)]
    waits = [r for r in results if isinstance(r, Wait)]
    # Two per second; the third in the same second waits (unless the second ticked over).
    assert len(waits) <= 1
    if waits:
        assert waits[0].reason == "rate"


def test_force_open_holds_and_force_close_resumes_both_audited():
    user = User.objects.create_user("oncall")
    user.groups.add(Group.objects.get_or_create(name="ops")[0])
    breaker.force("card", "open", user=user)
    b = Breaker.objects.get(provider="card")
    assert b.state == "open" and b.forced
    b.probe_at = timezone.now() - timedelta(seconds=5)
    b.save()
    assert isinstance(admit("card"), Wait)  # no canaries while held open
    breaker.force("card", "closed", user=user)
    assert _state() == "closed"
    assert isinstance(admit("card"), Ticket)
    actions = list(
        AuditEntry.objects.order_by("at").values_list("action", "actor_name", "target", "source")
    )
    assert actions == [
        ("breaker.force_open", "oncall", "provider:card", "cli"),
        ("breaker.force_closed", "oncall", "provider:card", "cli"),
    ]


def test_provider_outage_command_fails_every_call_of_that_provider_and_counts_them(capsys):
    @fault_point("shipping.arrange")
    def arrange():
        return "arranged"

    outage._read_at = float("-inf")
    call_command("provider_outage", "shipping", "--seconds", "30")
    outage._read_at = float("-inf")
    for _ in range(3):
        with pytest.raises(InjectedError, match="outage"):
            arrange()
    assert FakeProviderStatus.objects.get(provider="shipping").calls_while_down == 3
    call_command("provider_outage", "shipping", "--end")
    outage._read_at = float("-inf")
    assert arrange() == "arranged"
    assert "back up" in capsys.readouterr().out


def test_provider_outage_command_rejects_bad_input():
    from django.core.management.base import CommandError

    with pytest.raises(CommandError):
        call_command("provider_outage", "shipping", "--seconds", "0")
    with pytest.raises(CommandError):
        call_command("provider_outage", "nosuch", "--seconds", "5")


def test_a_sudden_outage_opens_it_even_when_the_window_is_full_of_earlier_successes():
    from providers.models import HealthBucket

    # Twenty seconds of a busy, healthy provider: 2000 successes in the window.
    now = int(timezone.now().timestamp())
    breaker.ensure_breaker("card")
    HealthBucket.objects.bulk_create(
        [HealthBucket(provider="card", second=now - 20 + i, ok=100) for i in range(17)]
    )
    for _ in range(4):
        _call(ok=False)
    # 4 failures in 1704 calls over the window, but every recent call failed.
    assert _state() == "open"


def _busy_then(generation: int, now: int, *later: tuple[int, int, int]) -> None:
    """Ten busy, healthy seconds (200 calls) from 22 s ago, then one ``(ok, failed,
    failed_since_ok)`` bucket every three seconds from 9 s ago."""
    from providers.models import HealthBucket

    busy = [HealthBucket(provider="card", generation=generation, second=now - 22 + i, ok=20)
            for i in range(10)]  # fmt: skip
    HealthBucket.objects.bulk_create(
        busy
        + [
            HealthBucket(
                provider="card",
                generation=generation,
                second=now - 9 + 3 * i,
                ok=ok,
                failed=failed,
                failed_since_ok=since,
            )
            for i, (ok, failed, since) in enumerate(later)
        ]
    )


def test_failures_in_a_row_spread_over_seconds_open_it_past_earlier_successes():
    """An outage met by a few sagas whose retries spread their failures (backed off, or held up
    by a broker outage): one failed call every few seconds, none answered, after a busy
    healthy spell. ``min_calls`` failures in a row open the breaker however far apart they
    came within the window (counted only within two seconds they were never enough, and the
    saga whose last attempt was among them was cancelled for the outage)."""
    breaker.ensure_breaker("card")
    generation = Breaker.objects.get(provider="card").generation
    _busy_then(generation, int(timezone.now().timestamp()), (0, 1, 1), (0, 1, 1), (0, 1, 1))
    assert breaker.window_counts("card") == (203, 3)
    _call(ok=False)  # the fourth failure in a row: 4 of 204 in the window
    assert _state() == "open"
    assert Breaker.objects.get(provider="card").generation == generation


def test_the_second_an_outage_began_in_counts_its_failures_after_the_last_success():
    """The outage began within a busy second: its last successes, then the first failure. That
    failure is in the row (the bucket counts the failures since its last success), so four in
    a row open the breaker; counting only seconds without a success, it would take five."""
    breaker.ensure_breaker("card")
    generation = Breaker.objects.get(provider="card").generation
    _busy_then(generation, int(timezone.now().timestamp()), (20, 1, 1), (0, 1, 1), (0, 1, 1))
    _call(ok=False)
    assert _state() == "open"


def test_a_call_answered_between_spread_failures_keeps_it_closed():
    """The same four failures with a call answered after one of them: the provider is up for
    someone, so no row of ``min_calls`` failures, and too few in two seconds or in the window
    to open it (four of the five calls since the first failure is no row)."""
    breaker.ensure_breaker("card")
    generation = Breaker.objects.get(provider="card").generation
    _busy_then(generation, int(timezone.now().timestamp()), (0, 1, 1), (1, 1, 0), (0, 1, 1))
    _call(ok=False)
    assert _state() == "closed"


@pytest.mark.parametrize("carried", [False, True], ids=["own statement", "carried"])
def test_a_bucket_counts_the_failures_since_its_last_success(carried):
    """Within one second: two failures, a success, a failure. The bucket's totals say 3 and 1;
    the failures since its last success, 1. Counted alone or in a carried statement alike."""
    from providers.models import HealthBucket

    breaker.ensure_breaker("card")
    ticket = admit("card")
    assert isinstance(ticket, Ticket)
    at = timezone.now().replace(microsecond=0) - timedelta(seconds=5)
    for ok in (False, False, True, False):
        if carried:
            breaker._release_and_count(ticket, at, ok)
        else:
            breaker._count("card", ticket.generation, at, ok)
    bucket = HealthBucket.objects.get(provider="card", second=int(at.timestamp()))
    assert (bucket.ok, bucket.failed, bucket.failed_since_ok) == (1, 3, 1)


def test_rows_deleted_under_a_running_process_are_recreated_not_fatal():
    """A worker outlives a flushed test database (or a cleanup): its caches must not lie."""
    report(admit("card"), ok=True)
    Breaker.objects.all().delete()
    CallSlot.objects.all().delete()
    ticket = admit("card")
    assert isinstance(ticket, Ticket) and ticket.slot_id is not None
    assert Breaker.objects.filter(provider="card").exists()


def test_metrics_have_per_provider_gauges_and_counters():
    from django.test import Client

    ticket = admit("card")
    report(ticket, ok=False)
    body = Client().get("/metrics").content.decode()
    assert 'provider_breaker_state{provider="card"} 0.0' in body
    assert 'provider_calls_in_flight{provider="card"} 0.0' in body
    assert 'provider_failure_rate{provider="card"} 1.0' in body
    assert 'provider_parked_sagas{provider="card"}' in body
    assert 'provider_calls_total{outcome="failed",provider="card"}' in body


def test_while_canaries_are_out_others_look_again_within_a_cooldown(settings):
    """Not at the canaries' lease (the step timeout): a recovered provider is used again soon."""
    settings.SAGA_PROVIDERS = {"card": {**KNOBS, "cooldown": 1}}
    for _ in range(4):
        _call(ok=False)
    Breaker.objects.filter(provider="card").update(probe_at=timezone.now())
    assert admit("card").canary and admit("card").canary
    wait = admit("card")
    assert isinstance(wait, Wait) and wait.reason == "half_open"
    assert wait.delay <= 1.1


def _cooldown_over() -> None:
    """The open breaker's cool-down (or a half-open round's canary lease) has passed: the
    next caller starts a new half-open round."""
    Breaker.objects.filter(provider="card").update(probe_at=timezone.now())


def test_a_slow_canary_of_an_earlier_round_does_not_close_the_breaker(settings):
    """Round one's second canary answers only after the first one's failure re-opened the
    breaker and a new round began: its success was seen before that failure and says nothing
    of the provider now, so the new round's canaries decide alone."""
    settings.SAGA_PROVIDERS = {"card": {**KNOBS, "cooldown": 60, "max_in_flight": 6}}
    for _ in range(4):
        _call(ok=False)
    _cooldown_over()
    first, slow = admit("card"), admit("card")
    report(first, ok=False)
    assert _state() == "open"

    _cooldown_over()
    current = [admit("card"), admit("card")]
    assert all(t.canary for t in current) and _state() == "half_open"
    report(slow, ok=True)  # the earlier round's late answer
    report(current[0], ok=True)
    assert _state() == "half_open"  # one of the round's two successes, not two
    assert Breaker.objects.get(provider="card").canary_ok == 1
    report(current[1], ok=True)
    assert _state() == "closed"


def test_a_slow_canary_of_an_earlier_round_does_not_reopen_the_breaker(settings):
    """Three canaries a round at 0.5: two failures re-open. An old failure arriving in the
    next round is not its second."""
    settings.SAGA_PROVIDERS = {"card": {**KNOBS, "cooldown": 60, "canaries": 3, "max_in_flight": 9}}
    for _ in range(4):
        _call(ok=False)
    _cooldown_over()
    first, second, slow = admit("card"), admit("card"), admit("card")
    report(first, ok=False)
    report(second, ok=False)
    assert _state() == "open"

    _cooldown_over()
    current = [admit("card") for _ in range(3)]
    assert all(t.canary for t in current)
    report(current[0], ok=False)
    report(slow, ok=False)  # the earlier round's late failure
    assert _state() == "half_open"
    assert Breaker.objects.get(provider="card").canary_failed == 1
    report(current[1], ok=False)
    assert _state() == "open"  # the round's own second failure does


def test_a_canary_presumed_lost_does_not_count_in_the_round_after_it(settings):
    """A canary whose lease passed is presumed lost and a new round starts, the breaker still
    half-open; if it answers after all, that answer belongs to the round it was let through in."""
    settings.SAGA_PROVIDERS = {"card": {**KNOBS, "cooldown": 60, "canaries": 1}}
    for _ in range(4):
        _call(ok=False)
    _cooldown_over()
    lost = admit("card")
    assert lost.canary and isinstance(admit("card"), Wait)
    _cooldown_over()  # its lease has passed
    current = admit("card")
    assert current.canary and _state() == "half_open"
    report(lost, ok=True)
    assert _state() == "half_open"
    report(current, ok=True)
    assert _state() == "closed"
    # Both answers are still counted as the provider's calls (they happened).
    assert breaker.window_counts("card", generation=0) == (6, 4)


def test_a_canary_giving_its_place_back_gives_it_to_its_own_round_only(settings):
    """A canary that finds no call slot gives its place back; if a new round began in between
    (another worker), that round's canaries are its own and keep their count."""
    settings.SAGA_PROVIDERS = {"card": {**KNOBS, "cooldown": 60, "canaries": 1}}
    for _ in range(4):
        _call(ok=False)
    _cooldown_over()
    old_round = admit("card").canary_round
    _cooldown_over()
    current = admit("card")
    assert current.canary and current.canary_round != old_round
    breaker._return_canary("card", old_round)
    assert Breaker.objects.get(provider="card").canaries == 1
    assert isinstance(admit("card"), Wait)  # the round's one canary is still out
    breaker._return_canary("card", current.canary_round)
    assert Breaker.objects.get(provider="card").canaries == 0


def test_a_breaker_row_written_by_the_release_before_the_canary_counts_is_taken():
    """During a rolling deploy, code of the release before ``canary_failed`` and
    ``canary_round`` still creates breaker rows (a provider's first call) after the migration
    added them: the database fills both in itself. Without a database default the INSERT
    failed on NOT NULL, which ``ensure_breaker`` swallows, and the old code's ``admit`` looked
    for the row it could not create again and again."""
    from django.db import connection

    now = timezone.now()
    with connection.cursor() as cursor:  # the columns the release before knew of
        cursor.execute(
            f"INSERT INTO {Breaker._meta.db_table} (provider, state, since, probe_at, canaries, "
            "canary_ok, forced, generation, updated_at) "
            "VALUES (%s, 'closed', %s, NULL, 0, 0, false, 0, %s)",
            ["old-release", now, now],
        )
    taken = Breaker.objects.get(provider="old-release")
    assert (taken.canary_failed, taken.canary_round) == (0, 0)
