"""Pump slots: fewer doorbells than sagas when many are due at once, and none forgotten.

A doorbell sent with a pump slot (its ``saga_pump`` header) runs its saga, then claims the
oldest due sagas from the database. While every slot is taken, a start sends no message at all.
The tests count the messages on this session's queue (``queued_doorbells``) and the ``sagas.run``
tasks a worker started (``SAGA_TEST_RECORD_DELIVERIES``), and check every saga still succeeds.
"""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from django.conf import settings
from django.db import connection, transaction
from django.db.models import F
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from config.celery import app
from providers import breaker as provider_breaker
from sagas import pumps
from sagas.doorbell import PUMP_HEADER, queued_doorbells
from sagas.models import Saga, SagaState
from sagas.runner import _park_for_provider, _pump, advance, run_claimed
from sagas.selectors import saga_is_stuck
from sagas.services import saga_start
from sagas.store import Record, claim, claim_due, claiming_ahead, due_saga, write
from sagas.timing import inline_until, task_timeout
from tests.conftest import manage_shell, purge_queue, wait_until
from tests.sagas.sagatypes import (
    FIVE,
    RECORD_DELIVERIES,
    effects,
    ensure_deliveries_table,
    ensure_effects_table,
)

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True)]


@pytest.fixture(autouse=True)
def _tables(transactional_db):
    ensure_effects_table()
    ensure_deliveries_table()


@pytest.fixture
def slots(settings):
    """A few slots, none held when the test starts or ends (the key is this session's own)."""
    settings.SAGA_PUMPS = 3
    script = pumps._script()
    assert script is not None, "the tests run with Redis: pump slots must be in use"
    client = script.registered_client
    client.delete(pumps.key())
    pumps._down_until = 0.0
    pumps._unreleased.clear()
    yield client
    client.delete(pumps.key())
    pumps._down_until = 0.0


@pytest.fixture
def quiet_queue(worker_factory):
    """Nothing consumes this session's queue during the test (its messages stay countable),
    and no pump runs that could claim or ring for the test's sagas."""
    # Started only to pause the session worker (exclusive), then killed, so it has no
    # blocking receive out on the queue either (see _until_queued).
    worker_factory(name="idle", exclusive=True).kill()
    purge_queue()
    yield
    purge_queue()


def start(saga_type: str = "test5") -> Saga:
    with transaction.atomic():
        return saga_start(saga_type=saga_type, data={"script": {}})


def _queued() -> int:
    depth = queued_doorbells()
    assert depth is not None
    return depth


def _until_queued(count: int) -> None:
    """Wait until ``count`` messages are on the queue. A worker paused a moment ago may still
    have a blocking receive out on it (Redis ``BRPOP``, up to a second): a message it catches
    finds no consumer and goes back on the queue, so for that moment it is not counted."""
    wait_until(lambda: _queued() == count, timeout=10, describe=_queued)


def _run_tasks(saga_ids: list[str]) -> int:
    """``sagas.run`` tasks the recording worker started for these sagas."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM test_saga_deliveries WHERE saga_id = ANY(%s)", [saga_ids]
        )
        return cursor.fetchone()[0]


def _start_from_a_process_with(env: dict[str, str], count: int) -> list[str]:
    """Start ``count`` sagas from a process of its own configured with ``env`` (as a web process
    of the same deployment would be: its doorbells carry the time limits it configures)."""
    code = (
        "from django.db import transaction\n"
        "from sagas.services import saga_start\n"
        f"for _ in range({count}):\n"
        "    with transaction.atomic():\n"
        "        print(saga_start(saga_type='test5', data={'script': {}}).id)\n"
    )
    return manage_shell(env, code).strip().splitlines()[-count:]


def test_with_every_slot_taken_starts_send_nothing_and_the_pumps_run_them(
    slots, worker_factory, wait_for
):
    """Twenty starts with three slots: three messages on the queue, no more. A worker then runs
    all twenty: the pumps claim the other seventeen from the database."""
    # A budget of 30 s in the worker and in the starting process alike (a task's limits come
    # from its sender), so however loaded the machine, a pump never runs out of budget here.
    env = {"SAGA_PUMPS": "3", "SAGA_INLINE_BUDGET": "30"}
    worker = worker_factory({RECORD_DELIVERIES: "1", **env}, name="pump", exclusive=True)
    worker.pause_consuming()
    worker.wait_idle()  # a leftover doorbell it took would pump the sagas started below
    purge_queue()
    ids = _start_from_a_process_with(env, 20)
    _until_queued(3)
    assert pumps.held() == 3
    worker.resume_consuming()
    wait_for(
        lambda: Saga.objects.filter(state=SagaState.SUCCEEDED, id__in=ids).count() == 20,
        timeout=60,
        describe=lambda: list(Saga.objects.filter(id__in=ids).values_list("state", "version")),
    )
    for saga_id in ids:
        assert effects(saga_id) == {(name, "do"): 1 for name in FIVE}
    # Three doorbells were ever sent for twenty sagas (the last of them may still be on its
    # way to a pool process when the sagas are done), and each pump gave its slot back.
    wait_for(
        lambda: pumps.held() == 0 and _run_tasks(ids) >= 3,
        describe=lambda: (pumps.held(), _run_tasks(ids)),
    )
    assert _run_tasks(ids) == 3
    assert _queued() == 0


def test_with_slots_off_every_start_sends_its_own_doorbell(settings, slots, quiet_queue):
    """``SAGA_PUMPS=0``: one message per saga, as before slots existed."""
    settings.SAGA_PUMPS = 0
    for _ in range(20):
        start()
    _until_queued(20)
    assert pumps.held() == 0


def test_a_pump_runs_a_saga_whose_start_found_every_slot_taken(slots, settings, quiet_queue):
    """The start rang nothing (one slot, held); the pump holding it claims the saga from the
    database, runs it to the end, and gives the slot back."""
    settings.SAGA_PUMPS = 1
    slot = pumps.acquire()
    assert isinstance(slot, str)
    saga = start()
    assert _queued() == 0
    until = inline_until.set(time.monotonic() + 30)
    try:
        _pump(lambda: None, slot)
    finally:
        inline_until.reset(until)
    saga.refresh_from_db()
    assert saga.state == SagaState.SUCCEEDED
    assert effects(saga.id) == {(name, "do"): 1 for name in FIVE}
    assert pumps.held() == 0
    assert _queued() == 0


def test_a_pump_out_of_budget_hands_its_slot_to_a_doorbell_for_the_saga_it_finds(
    slots, settings, quiet_queue
):
    """The last look after the slot is given back: a saga came in while the only slot was held
    (its start rang nothing). The pump, out of budget, takes a slot again and sends a doorbell
    for that saga carrying it, so the saga is not left to the sweeper."""
    settings.SAGA_PUMPS = 1
    slot = pumps.acquire()
    assert isinstance(slot, str)
    saga = start()
    assert _queued() == 0
    until = inline_until.set(time.monotonic() - 1)  # the budget is spent
    try:
        _pump(lambda: None, slot)
    finally:
        inline_until.reset(until)
    _until_queued(1)
    assert pumps.held() == 1
    with app.connection_for_read() as conn:
        message = conn.SimpleQueue(settings.CELERY_TASK_DEFAULT_QUEUE, no_ack=True).get(timeout=5)
    assert message.headers["task"] == "sagas.run"
    assert message.headers["argsrepr"] == repr((str(saga.id), saga.version))
    assert message.headers[PUMP_HEADER] not in ("", None, slot)


def _statements(captured: CaptureQueriesContext) -> tuple[int, int]:
    """``(records that claimed the next saga, claims on their own)`` among the statements."""
    texts = [q["sql"] for q in captured.captured_queries]
    records = [t for t in texts if " s AS (UPDATE" in t]
    claims = [t for t in texts if "SKIP LOCKED" in t and t not in records and " SET " in t]
    return sum(", n AS (UPDATE" in t for t in records), len(claims)


def test_a_pumps_record_claims_the_next_due_saga(slots, settings, quiet_queue):
    """Three sagas waiting, none rung: the pump claims the first on its own; the record that
    ends each claims the next, in the same statement, so the pump's only other claim is the
    one that finds nothing left. Each saga runs once, to the end."""
    settings.SAGA_PUMPS = 1
    slot = pumps.acquire()
    assert isinstance(slot, str)
    sagas = [start() for _ in range(3)]
    assert _queued() == 0
    until = inline_until.set(time.monotonic() + 30)
    try:
        with CaptureQueriesContext(connection) as captured:
            _pump(lambda: None, slot)
    finally:
        inline_until.reset(until)
    for saga in sagas:
        saga.refresh_from_db()
        assert saga.state == SagaState.SUCCEEDED
        assert effects(saga.id) == {(name, "do"): 1 for name in FIVE}
    assert _statements(captured) == (3, 2)
    assert pumps.held() == 0


def _xmin(saga_id: object) -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT xmin::text::bigint FROM sagas_saga WHERE id = %s", [saga_id])
        return cursor.fetchone()[0]


def _record_letting_go(claimed: Saga) -> Saga | None:
    """The record of a task that lets go of the saga (a retry in a minute), as a pump writes it."""
    later = {"next_attempt_at": timezone.now() + timedelta(minutes=1), "lease_until": None}
    return write(claimed, Record(fields=later, ring_after=60.0), inline_ok=False)


@pytest.fixture
def budget():
    until = inline_until.set(time.monotonic() + 30)
    yield
    inline_until.reset(until)


def test_a_record_claims_ahead_in_its_own_commit(slots, settings, quiet_queue, budget):
    """The next saga is claimed by the record's own transaction (one commit for both rows),
    and handed to the pump with the version and lease the claim gave it."""
    settings.SAGA_PUMPS = 1
    assert isinstance(pumps.acquire(), str)  # the starts below ring nothing
    first, second = start(), start()
    claimed = claim(first.id, first.version)
    assert claimed is not None
    with claiming_ahead() as ahead:
        assert _record_letting_go(claimed) is None
    assert [(s.id, s.version) for s in ahead.sagas] == [(second.id, second.version + 1)]
    row = Saga.objects.get(pk=second.id)
    assert row.version == second.version + 1 and row.lease_until > timezone.now()
    assert _xmin(first.id) == _xmin(second.id)


def test_a_claim_ahead_rolled_back_with_its_record_is_not_handed_over(
    slots, settings, quiet_queue, budget
):
    """A record inside a transaction that rolls back (a transactional step's, refused at
    commit): the claim it carried rolls back with it, and the pump gets nothing to run."""
    settings.SAGA_PUMPS = 1
    assert isinstance(pumps.acquire(), str)
    first, second = start(), start()
    claimed = claim(first.id, first.version)
    assert claimed is not None
    with claiming_ahead() as ahead, transaction.atomic():
        _record_letting_go(claimed)
        # The record claimed the second saga in its statement, not yet handed over.
        taken = Saga.objects.get(pk=second.id)
        assert taken.version == second.version + 1 and taken.lease_until is not None
        assert ahead.sagas == []
        transaction.set_rollback(True)
    assert ahead.sagas == []
    assert due_saga() == (second.id, second.version)  # first is still leased to its claim
    row = Saga.objects.get(pk=second.id)
    assert row.version == second.version and row.lease_until is None


def test_a_record_never_claims_its_own_saga(slots, settings, quiet_queue, budget):
    """A signal arrived while the task wrote its record: the saga is at a newer version, due
    and free. The record is fenced off, and the claim riding in it does not take that saga
    (which would look like the record's own row): the pump's own claim takes it, as before."""
    settings.SAGA_PUMPS = 1
    assert isinstance(pumps.acquire(), str)
    first = start()
    claimed = claim(first.id, first.version)
    assert claimed is not None
    # What a signal's delivery does (sagas.signals): a new version, no lease, due now.
    Saga.objects.filter(pk=first.id).update(
        version=F("version") + 1, lease_until=None, next_attempt_at=timezone.now()
    )
    with claiming_ahead() as ahead:
        assert _record_letting_go(claimed) is None
    assert ahead.sagas == []
    assert _queued() == 0  # fenced off: no doorbell for a retry that was never recorded
    row = Saga.objects.get(pk=first.id)
    assert (row.version, row.lease_until) == (claimed.version + 1, None)
    taken = claim_due()
    assert taken is not None and taken.id == first.id


def test_a_fenced_off_record_still_hands_over_the_saga_it_claimed(
    slots, settings, quiet_queue, budget
):
    """A record fenced off (a newer claim holds its saga) that commits on its own still
    committed its claim of the next saga: the pump gets that saga, rather than leaving it
    leased to nobody until the sweeper finds it."""
    settings.SAGA_PUMPS = 1
    assert isinstance(pumps.acquire(), str)
    first, second = start(), start()
    claimed = claim(first.id, first.version)
    assert claimed is not None
    Saga.objects.filter(pk=first.id).update(version=F("version") + 1)  # a newer claim
    with claiming_ahead() as ahead:
        assert _record_letting_go(claimed) is None
    assert [(s.id, s.version) for s in ahead.sagas] == [(second.id, second.version + 1)]


def test_a_saga_claimed_ahead_past_the_budget_is_handed_back(slots, settings, quiet_queue):
    """The budget ran out after a record claimed the next saga (the task went on with its own
    saga meanwhile, as after a cancel seen at the record): the pump does not start it, it
    releases it as if never claimed, with a doorbell."""
    settings.SAGA_PUMPS = 1
    slot = pumps.acquire()
    assert isinstance(slot, str)
    first, second = start(), start()

    def first_then_out_of_budget() -> Saga | None:
        claimed = claim(first.id, first.version)
        assert claimed is not None
        _record_letting_go(claimed)
        inline_until.set(time.monotonic() - 1)  # the budget is spent
        return None

    until = inline_until.set(time.monotonic() + 30)
    try:
        _pump(first_then_out_of_budget, slot)
    finally:
        inline_until.reset(until)
    row = Saga.objects.get(pk=second.id)
    assert row.version == second.version + 2  # claimed ahead, then let go
    assert (row.attempt, row.lease_until, row.state) == (second.attempt, None, SagaState.RUNNING)
    assert effects(second.id) == {}
    _until_queued(3)  # its own, the last look's (with the slot), the first saga's retry
    with app.connection_for_read() as conn:
        queue = conn.SimpleQueue(settings.CELERY_TASK_DEFAULT_QUEUE, no_ack=True)
        rung = [queue.get(timeout=5).headers["argsrepr"] for _ in range(3)]
    assert rung.count(repr((str(second.id), row.version))) == 2


def test_a_failing_pump_hands_back_the_saga_it_claimed_ahead(slots, settings, quiet_queue):
    """The task fails after a record claimed the next saga: that saga is released as if never
    claimed (its attempt not counted, no lease) and gets a doorbell; the pump's last look then
    finds it due and hands it a doorbell with the slot, as for any saga a failing pump left."""
    settings.SAGA_PUMPS = 1
    slot = pumps.acquire()
    assert isinstance(slot, str)
    first, second = start(), start()
    assert _queued() == 0

    def first_then_fail() -> Saga | None:
        claimed = claim(first.id, first.version)
        assert claimed is not None
        _record_letting_go(claimed)
        raise RuntimeError("the task fails here")

    until = inline_until.set(time.monotonic() + 30)
    try:
        with pytest.raises(RuntimeError):
            _pump(first_then_fail, slot)
    finally:
        inline_until.reset(until)
    row = Saga.objects.get(pk=second.id)
    assert row.version == second.version + 2  # claimed ahead, then let go
    assert (row.attempt, row.lease_until) == (second.attempt, None)
    _until_queued(3)  # and the first saga's retry, in a minute
    assert pumps.held() == 1  # handed on with the last look's doorbell
    with app.connection_for_read() as conn:
        queue = conn.SimpleQueue(settings.CELERY_TASK_DEFAULT_QUEUE, no_ack=True)
        rung = [queue.get(timeout=5).headers["argsrepr"] for _ in range(3)]
    assert rung.count(repr((str(second.id), row.version))) == 2


def test_pumps_leave_a_step_longer_than_the_default_timeout_to_its_own_doorbell(slots, quiet_queue):
    """``policy``'s ``slow`` step has 8 s, more than a pump's task may run: a pump passes it by."""
    saga = start("policy")
    Saga.objects.filter(pk=saga.id).update(current_step="slow", step_index=2)
    assert due_saga() is None
    assert claim_due() is None
    Saga.objects.filter(pk=saga.id).update(current_step="quick", step_index=0)
    assert due_saga() == (saga.id, saga.version)
    claimed = claim_due()
    assert claimed is not None and claimed.id == saga.id and claimed.version == saga.version + 1


def _out_of_the_pumps_index(saga_id: object) -> Saga:
    """The saga's lease has run out (no task holds it) but is not none, so the pumps' partial
    index does not hold it; the ops console's "stuck" takes it as unleased."""
    row = Saga.objects.get(pk=saga_id)
    assert (row.state, row.current_step) == (SagaState.RUNNING, "slow")
    assert row.lease_until is not None and row.lease_until <= timezone.now()
    assert saga_is_stuck(row, now=row.next_attempt_at + timedelta(seconds=31))
    with connection.cursor() as cursor:  # the pumps' partial index, by its own predicate
        cursor.execute(
            "SELECT count(*) FROM sagas_saga WHERE lease_until IS NULL "
            "AND state IN ('running', 'compensating') AND id = %s",
            [saga_id],
        )
        assert cursor.fetchone()[0] == 0
    return row


def _only_its_doorbell_runs(saga_id: object, version: int) -> None:
    """The saga waits, due now, for the doorbell sent with its step's limits, out of the pumps'
    index; that doorbell's own claim takes it."""
    row = _out_of_the_pumps_index(saga_id)
    assert row.attempt == 0 and row.version == version
    assert due_saga() is None and claim_due() is None
    with app.connection_for_read() as conn:
        queue = conn.SimpleQueue(settings.CELERY_TASK_DEFAULT_QUEUE, no_ack=True)
        bodies = [queue.get(timeout=5) for _ in range(_queued())]
    slow = [m for m in bodies if m.headers["argsrepr"] == repr((str(saga_id), version))]
    assert len(slow) == 1 and slow[0].headers["timelimit"][1] is not None  # slow's own limits
    claimed = claim(saga_id, version, 8.0)
    assert claimed is not None and claimed.lease_until > timezone.now()


def test_a_saga_handed_to_a_step_only_its_doorbell_runs_stays_out_of_the_pumps_index(
    slots, quiet_queue, settings
):
    """``quick`` and ``picky`` run here, as the start's task would run them; the record that
    hands the saga on to ``slow`` (8 s, more than a pump's task may run) rings slow's own
    doorbell and leaves a lease that has run out instead of none. A pump would pass the saga
    by anyway; out of the pumps' index, a backlog of such sagas (the order saga's carrier step
    under load) costs a pump's claim nothing, where each claim read past all of them."""
    settings.SAGA_INLINE_BUDGET = 30.0  # both short steps fit, however loaded the machine
    saga = start("policy")
    _until_queued(1)  # the start's doorbell
    advance(saga.id, saga.version)
    _until_queued(2)
    row = Saga.objects.get(pk=saga.id)
    _only_its_doorbell_runs(saga.id, row.version)


def test_a_saga_handed_back_for_a_longer_step_stays_out_of_the_pumps_index(slots, quiet_queue):
    """A doorbell with the default limits claims the saga at ``slow``: the task hands it back
    (no attempt counted) to a doorbell with slow's limits, leaving a lease that has run out."""
    saga = start("policy")
    Saga.objects.filter(pk=saga.id).update(current_step="slow", step_index=2)
    _until_queued(1)
    claimed = claim(saga.id, saga.version)
    assert claimed is not None
    assert run_claimed(claimed, inline_ok=True) is None
    _until_queued(2)
    _only_its_doorbell_runs(saga.id, claimed.version + 1)


def _claimed_at_slow(script: dict[str, list[str]]) -> Saga:
    """A ``policy`` saga at ``slow``, claimed as a doorbell with slow's own limits claims it."""
    with transaction.atomic():
        saga = saga_start(saga_type="policy", data={"script": script})
    Saga.objects.filter(pk=saga.id).update(current_step="slow", step_index=2)
    claimed = claim(saga.id, saga.version, 8.0)
    assert claimed is not None
    return claimed


def test_a_retry_of_a_step_only_its_doorbell_runs_stays_out_of_the_pumps_index(quiet_queue):
    """``slow`` fails transiently in a task with its limits: the retry is due after a backoff,
    with a countdown doorbell, and its lease has run out rather than being none."""
    claimed = _claimed_at_slow({"slow": ["transient"]})
    token = task_timeout.set(8.0)
    try:
        assert run_claimed(claimed, inline_ok=False) is None
    finally:
        task_timeout.reset(token)
    row = _out_of_the_pumps_index(claimed.id)
    assert row.last_error and row.next_attempt_at > row.updated_at  # a retry, after a backoff


@pytest.mark.parametrize(("reason", "parked_on"), [("in_flight", ""), ("open", "shipping")])
def test_a_saga_parked_on_a_step_only_its_doorbell_runs_stays_out_of_the_pumps_index(
    quiet_queue, reason, parked_on
):
    """The carrier's calls are at their limit, or its breaker is open: the saga parks on the
    provider (a countdown doorbell), its lease run out rather than none, so a pump does not
    read past it either. (A moment's wait for a call slot is no stay: ``parked_on`` stays.)"""
    claimed = _claimed_at_slow({})
    rec = Record()
    token = task_timeout.set(8.0)
    try:
        wait = provider_breaker.Wait("shipping", 0.3, reason)
        assert _park_for_provider(claimed, rec, step="slow", wait=wait, inline_ok=False) is None
    finally:
        task_timeout.reset(token)
    row = _out_of_the_pumps_index(claimed.id)
    assert row.parked_on == parked_on and row.attempt == 0


def test_a_slot_its_holder_never_gives_back_expires(slots, settings, wait_for):
    """A pump killed with its slot: the slot is free again after a lease."""
    settings.SAGA_PUMPS = 1
    settings.SAGA_STEP_TIMEOUT = 0.1
    settings.SAGA_INLINE_BUDGET = 0.0  # a lease of 5.1 s
    assert isinstance(pumps.acquire(), str)
    assert pumps.acquire() is None
    wait_for(lambda: isinstance(pumps.acquire(), str), timeout=20, describe=pumps.held)


def test_with_redis_not_answering_the_last_look_rings_a_plain_doorbell(
    slots, settings, quiet_queue
):
    """The pump's last look finds a saga whose start rang nothing, but no slot can be had
    (Redis not answering): the saga gets a doorbell of its own, without a slot."""
    settings.SAGA_PUMPS = 1
    slot = pumps.acquire()
    assert isinstance(slot, str)
    saga = start()
    assert _queued() == 0
    pumps._down_until = time.monotonic() + 60  # as after a failed call: slots are off a while
    until = inline_until.set(time.monotonic() - 1)
    try:
        _pump(lambda: None, slot)
    finally:
        inline_until.reset(until)
    _until_queued(1)
    with app.connection_for_read() as conn:
        message = conn.SimpleQueue(settings.CELERY_TASK_DEFAULT_QUEUE, no_ack=True).get(timeout=5)
    assert message.headers["argsrepr"] == repr((str(saga.id), saga.version))
    assert message.headers[PUMP_HEADER] == pumps.NO_SLOT  # a pump, holding no slot


def test_a_last_look_the_database_does_not_answer_ends_the_pump_without_failing_it(
    slots, settings, quiet_queue
):
    """The server dropped the pump's connection before its last look: the task does not fail
    (its sagas are done), the slot is back, and nothing is rung (the sweeper's backstop pumps
    for the saga left waiting)."""
    from django.db import OperationalError, connection

    settings.SAGA_PUMPS = 1
    slot = pumps.acquire()
    assert isinstance(slot, str)
    saga = start()
    assert _queued() == 0
    with pytest.raises(OperationalError), connection.cursor() as cursor:
        cursor.execute("SELECT pg_terminate_backend(pg_backend_pid())")
    until = inline_until.set(time.monotonic() - 1)
    try:
        _pump(lambda: None, slot)
    finally:
        inline_until.reset(until)
        connection.close()  # the test's own next query opens a new one
    assert pumps.held() == 0
    assert _queued() == 0
    assert due_saga() == (saga.id, saga.version)  # still waiting, for the sweeper's pump


def test_a_slot_redis_did_not_take_back_is_given_back_with_the_next_call(slots, settings):
    """A release that fails (Redis not answering) is kept, and given back by the next call
    that gets through, instead of holding the slot for a whole lease."""
    settings.SAGA_PUMPS = 2
    first = pumps.acquire()
    assert isinstance(first, str)
    url = settings.SAGA_PUMP_REDIS_URL
    settings.SAGA_PUMP_REDIS_URL = "redis://127.0.0.1:1/0"  # nothing listens there
    pumps.release(first)
    assert pumps._unreleased == [first]
    settings.SAGA_PUMP_REDIS_URL = url
    pumps._down_until = 0.0
    assert pumps.held() == 1
    second = pumps.acquire()
    assert isinstance(second, str)
    assert pumps.held() == 1  # the second only: the first was given back first
    assert pumps._unreleased == []


def test_sagas_woken_with_a_spread_come_due_over_it(settings, quiet_queue):
    """A provider's ``release_spread`` holds for the pumps too: each woken saga is due at its
    own moment within the spread (its doorbell's countdown the same), not all at once."""
    from django.utils import timezone

    from sagas.sweeper import wake_parked

    settings.SAGA_PROVIDERS = {"card": {"release_spread": 60}}
    ids = [start().id for _ in range(20)]
    Saga.objects.filter(id__in=ids).update(parked_on="card", next_attempt_at=None)
    before = timezone.now()
    assert wake_parked("card") == 20
    due = sorted(Saga.objects.filter(id__in=ids).values_list("next_attempt_at", flat=True))
    assert before <= due[0] and due[-1] <= before + timedelta(seconds=61)
    assert due[-1] - due[0] > timedelta(seconds=10)  # 20 uniform draws over 60 s
    assert Saga.objects.filter(id__in=ids, next_attempt_at__gt=timezone.now()).exists()


def test_the_sweeper_sends_a_pump_for_sagas_that_waited_longer_than_a_pumps_budget(
    slots, settings, quiet_queue
):
    """Every slot is taken by a holder that will never look (a worker killed mid-pump), so a
    start rings nothing. The next sweep, well before that slot expires, sends a pump doorbell
    that holds no slot for the saga that waited; a sweep with nothing waiting sends none."""
    from django.utils import timezone

    from sagas.sweeper import sweep

    settings.SAGA_PUMPS = 1
    settings.SAGA_STUCK_AFTER = 60  # not yet the sweeper's own re-ring
    assert isinstance(pumps.acquire(), str)  # the ghost
    assert sweep()["pumped"] == 0
    saga = start()
    assert _queued() == 0
    assert sweep()["pumped"] == 0  # due for less than a pump's budget: pumps are merely busy
    Saga.objects.filter(pk=saga.id).update(next_attempt_at=timezone.now() - timedelta(seconds=5))
    assert sweep()["pumped"] == 1
    _until_queued(1)
    with app.connection_for_read() as conn:
        message = conn.SimpleQueue(settings.CELERY_TASK_DEFAULT_QUEUE, no_ack=True).get(timeout=5)
    assert message.headers["argsrepr"] == repr((str(saga.id), saga.version))
    assert message.headers[PUMP_HEADER] == pumps.NO_SLOT


def test_a_pump_holding_no_slot_runs_on_a_real_worker(slots, settings, worker_factory, wait_for):
    """The sweeper's backstop doorbell (a pump holding no slot) through a real worker: it runs
    the saga that waited, and has no slot to give back (the ghost's stays taken)."""
    from django.utils import timezone

    from sagas.sweeper import sweep

    settings.SAGA_PUMPS = 1
    settings.SAGA_STUCK_AFTER = 60
    worker = worker_factory({"SAGA_PUMPS": "1", RECORD_DELIVERIES: "1"}, exclusive=True)
    worker.pause_consuming()
    worker.wait_idle()  # a leftover doorbell it took would pump the saga started below
    purge_queue()
    settings.SAGA_STEP_TIMEOUT = 60  # the ghost's lease outlasts a slow machine's test run
    ghost = pumps.acquire()  # its holder will never look
    assert isinstance(ghost, str)
    waited = start()
    assert _queued() == 0
    Saga.objects.filter(pk=waited.id).update(next_attempt_at=timezone.now() - timedelta(seconds=5))
    assert sweep()["pumped"] == 1
    worker.resume_consuming()
    wait_for(
        lambda: Saga.objects.filter(id=waited.id, state=SagaState.SUCCEEDED).exists(),
        describe=lambda: Saga.objects.filter(id=waited.id).values("state", "version").first(),
    )
    assert effects(waited.id) == {(name, "do"): 1 for name in FIVE}
    assert _run_tasks([str(waited.id)]) == 1
    assert pumps.held() == 1
