"""``manage.py saga_migrate`` between versions whose steps change places, driven in-process.

The ``swap`` type (:mod:`tests.sagas.sagatypes`): v1 ``a, go (Wait), b, c, x (Wait), p``, v2
runs ``c`` before ``b``, v3 has no ``c``; ``p`` is the pivot and every step but the waits has an
undo. The undo ladder walks the saga's definition from its current step down, so a saga that
has run (or undone) ``b`` and ``c`` cannot take v2's order without undoing out of order or
twice; one that has reached neither can. A saga that has undone ``c`` cannot go to v3, which
has no row for it. Last, ``--apply`` passing by a saga another transaction holds, and the
order saga moved back to v1, which lacks two of v2's steps.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
from django.contrib.auth.models import Group, User
from django.core.management import call_command
from django.db import connection, transaction
from django.utils import timezone

from sagas.definition import get_definition
from sagas.models import Saga, SagaState, SagaStep, StepStatus
from sagas.services import saga_compensation_plan, saga_start, saga_undo_done
from sagas.signals import saga_signal
from sagas.versions import _FIELDS, _move
from tests.orders.conftest import make_product, place
from tests.sagas.inprocess import deliver, one_step_per_delivery, out_of_workers_reach
from tests.sagas.sagatypes import effects

V2_ORDER = ["a", "go", "c", "b", "x", "p"]


@pytest.fixture(autouse=True)
def _setup(settings):
    settings.SAGA_COMPENSATION_MAX_ATTEMPTS = 3
    one_step_per_delivery(settings, {})


@pytest.fixture
def ops() -> User:
    user = User.objects.create_user("ops-swap", is_staff=True)
    user.groups.add(Group.objects.get(name="ops"))
    return User.objects.get(pk=user.pk)


def migrate(*args: str, to: int = 2) -> str:
    out = io.StringIO()
    call_command("saga_migrate", "swap", "--from", "1", "--to", str(to), *args, stdout=out)
    return out.getvalue()


def start(script: dict | None = None) -> Saga:
    return saga_start(saga_type="swap", data={"script": script or {}}, version=1)


def until(saga: Saga, done: Callable[[Saga], bool]) -> Saga:
    """Deliver the saga one step at a time until ``done`` says so (of the row as it is now)."""
    saga = Saga.objects.get(pk=saga.pk)
    for _ in range(12):
        if done(saga):
            return saga
        saga = deliver(saga.id)
    raise AssertionError(f"never got there: {saga.state} at {saga.current_step}")


def parked_at(step: str) -> Callable[[Saga], bool]:
    return lambda s: s.current_step == step and s.waiting_since is not None


def settled(saga: Saga) -> bool:
    return saga.state in (SagaState.SUCCEEDED, SagaState.COMPENSATED, SagaState.NEEDS_MANUAL)


def signal(saga: Saga, name: str, user: User, *, ok: bool = True) -> None:
    saga_signal(saga_id=saga.id, name=name, payload={"ok": ok}, user=user)


def at_x(user: User, script: dict | None = None) -> Saga:
    """A v1 saga that ran ``a``, ``b`` and ``c`` and waits at ``x``."""
    saga = until(start(script), parked_at("go"))
    signal(saga, "go", user)
    return until(saga, parked_at("x"))


def undoing_b(user: User) -> Saga:
    """A v1 saga that was told no at ``x``, undid ``c``, and waits to try ``b``'s undo again
    (its first try failed with a transient error)."""
    saga = at_x(user, {"undo:b": ["transient", "ok"]})
    signal(saga, "x", user, ok=False)
    saga = until(saga, lambda s: s.events.filter(kind="compensation_retry", step="b").exists())
    assert (saga.state, saga.current_step, undos(saga)) == (SagaState.COMPENSATING, "b", ["c"])
    return saga


def undos(saga: Saga) -> list[str]:
    events = Saga.objects.get(pk=saga.pk).events.filter(kind="compensation_succeeded")
    return list(events.order_by("id").values_list("step", flat=True))


def ran(saga: Saga) -> list[str]:
    events = Saga.objects.get(pk=saga.pk).events.filter(kind="step_succeeded")
    return list(events.order_by("id").values_list("step", flat=True))


def version_of(saga: Saga) -> int:
    return Saga.objects.get(pk=saga.pk).definition_version


@pytest.mark.django_db
def test_a_saga_that_has_reached_neither_swapped_step_moves_and_runs_v2s_order(ops):
    saga = until(start(), parked_at("go"))

    plan = migrate()
    assert "Will move: 1" in plan and "1  running at go (step 2) -> go (step 2)" in plan
    assert "Cannot move: 0" in plan
    assert "Moved 1 saga from v1 to v2" in migrate("--apply")
    assert version_of(saga) == 2

    signal(saga, "go", ops)
    saga = until(saga, parked_at("x"))
    signal(saga, "x", ops)
    saga = until(saga, settled)
    assert saga.state == SagaState.SUCCEEDED
    assert ran(saga) == V2_ORDER


@pytest.mark.django_db
def test_a_running_saga_that_ran_both_swapped_steps_is_refused_and_undoes_newest_first(ops):
    """Moved, the saga would undo ``b`` before ``c`` (v2's order) though ``c`` ran last."""
    saga = at_x(ops)

    plan = migrate()
    assert "Will move: 0" in plan
    assert (
        "1  running at x: it has reached b and c, which run in the other order in v2 "
        "(its undos would not run newest first)" in plan
    )
    assert "Moved 0 sagas" in migrate("--apply")
    assert version_of(saga) == 1

    signal(saga, "x", ops, ok=False)
    saga = until(saga, settled)
    assert saga.state == SagaState.COMPENSATED
    assert undos(saga) == ["c", "b", "a"]


def _undoes_b_and_a_and_never_c_again(saga) -> None:
    """The saga undoing ``b`` with ``c`` undone already: the plan and the ladder say ``b``,
    ``a``; ``c``'s undo ran once, before."""
    assert [p["step"] for p in saga_compensation_plan(saga_id=saga.id)] == ["b", "a"]
    saga = until(saga, settled)
    assert saga.state == SagaState.COMPENSATED
    assert undos(saga) == ["c", "b", "a"]
    assert effects(saga.id)[("c", "undo")] == 1


@pytest.mark.django_db
def test_a_compensating_saga_that_undid_a_step_v2_puts_below_it_is_refused(ops):
    """Moved, the saga at ``b`` would find ``c`` below it in v2 and undo it a second time;
    the dry run (which passes undone steps by) would not have said so."""
    saga = undoing_b(ops)

    plan = migrate()
    assert "Will move: 0" in plan
    assert (
        "1  compensating at b: c is undone already and comes before b in v2 "
        "(its undo would run again)" in plan
    )
    assert "Moved 0 sagas" in migrate("--apply")
    assert version_of(saga) == 1

    _undoes_b_and_a_and_never_c_again(saga)


@pytest.mark.django_db
def test_a_running_saga_whose_next_step_v2_runs_before_its_current_one_is_refused(ops):
    """Moved while ``b`` waits for its retry, the saga would go on from ``b`` in v2, past
    ``c``, and never run it."""
    saga = until(start({"b": ["transient", "ok"]}), parked_at("go"))
    signal(saga, "go", ops)
    saga = until(saga, lambda s: s.events.filter(kind="step_retry", step="b").exists())
    assert (saga.state, saga.current_step) == (SagaState.RUNNING, "b")

    plan = migrate()
    assert "Will move: 0" in plan
    assert "1  running at b: c comes after b in v1 and before it in v2 (it would never run)" in plan
    assert "Moved 0 sagas" in migrate("--apply")
    assert version_of(saga) == 1

    saga = until(saga, parked_at("x"))
    assert ran(saga) == ["a", "go", "b", "c"]


@pytest.mark.django_db
def test_the_ladder_passes_by_a_step_already_undone_below_the_current_one(ops):
    """A saga an earlier ``saga_migrate`` moved to v2 while undoing ``b`` (before it refused
    such a move) has ``c`` undone below its current step: the engine undoes ``b`` and ``a``,
    as the dry run says, and never ``c`` again."""
    saga = undoing_b(ops)
    moved_as_before(saga)

    _undoes_b_and_a_and_never_c_again(saga)


@pytest.mark.django_db
def test_an_undo_done_by_hand_goes_on_below_past_a_step_already_undone(ops):
    """The same saga stuck on ``b``'s undo: once a person says it is done by hand, the ladder
    goes on with ``a``, not ``c``."""
    saga = at_x(ops, {"undo:b": ["transient"]})
    signal(saga, "x", ops, ok=False)
    saga = until(saga, settled)
    assert (saga.state, saga.current_step, undos(saga)) == (SagaState.NEEDS_MANUAL, "b", ["c"])
    moved_as_before(saga)

    saga_undo_done(saga_id=saga.id, user=ops, step="b", note="voided in the dashboard")
    assert Saga.objects.get(pk=saga.pk).current_step == "a"
    saga = until(saga, settled)
    assert saga.state == SagaState.COMPENSATED
    assert undos(saga) == ["c", "a"]
    assert effects(saga.id)[("c", "undo")] == 1


def undid_c_by_hand(user: User) -> Saga:
    """A v1 saga told no at ``x`` whose undo of ``c`` kept failing until a person did it by
    hand and said so: it goes on undoing ``b``."""
    saga = at_x(user, {"undo:c": ["transient"]})
    signal(saga, "x", user, ok=False)
    saga = until(saga, settled)
    assert (saga.state, saga.current_step, undos(saga)) == (SagaState.NEEDS_MANUAL, "c", [])
    saga_undo_done(saga_id=saga.id, user=user, step="c", note="cancelled in the dashboard")
    saga = Saga.objects.get(pk=saga.pk)
    assert (saga.state, saga.current_step) == (SagaState.COMPENSATING, "b")
    return saga


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("undone", "status"),
    [(undoing_b, StepStatus.COMPENSATED), (undid_c_by_hand, StepStatus.COMPENSATED_BY_HAND)],
    ids=["by the engine", "by hand"],
)
def test_a_saga_that_undid_a_step_the_target_lacks_is_refused_and_keeps_its_record(
    ops, undone, status
):
    """Moved to v3, the saga would lose ``c``'s row: what the engine knows of that undo (by
    hand, the mark that a person vouched for it outside the system)."""
    saga = undone(ops)

    plan = migrate(to=3)
    assert "Will move: 0" in plan
    assert (
        "1  compensating at b: c is undone already and does not exist in v3 (the record of "
        "its undo would be lost)" in plan
    )
    assert "Moved 0 sagas" in migrate("--apply", to=3)
    assert version_of(saga) == 1
    assert SagaStep.objects.get(saga_id=saga.id, name="c").status == status

    saga = until(saga, settled)
    assert saga.state == SagaState.COMPENSATED
    assert undos(saga)[-2:] == ["b", "a"]
    assert SagaStep.objects.get(saga_id=saga.id, name="c").status == status


@pytest.mark.django_db
def test_a_saga_that_never_reached_a_step_the_target_lacks_moves_without_its_row():
    """``c``'s row is pending, with nothing to keep: it goes with the move."""
    saga = until(start(), parked_at("go"))

    assert "Moved 1 saga from v1 to v3" in migrate("--apply", to=3)
    steps = SagaStep.objects.filter(saga_id=saga.id).order_by("index")
    assert [s.name for s in steps] == ["a", "go", "b", "x", "p"]


def moved_as_before(saga: Saga) -> None:
    """Move the saga to v2 as ``saga_migrate`` did before it refused such moves."""
    row = Saga.objects.filter(pk=saga.pk).values(*_FIELDS).get()
    assert _move(row, get_definition("swap", 1), get_definition("swap", 2), timezone.now())
    assert version_of(saga) == 2


@contextmanager
def held(saga_id) -> Iterator[None]:
    """Another transaction (a worker recording a step, say) holds the saga's row locked."""
    raw = connection.get_new_connection(connection.get_connection_params())
    try:
        raw.execute(f"SELECT id FROM {Saga._meta.db_table} WHERE id = %s FOR UPDATE", [saga_id])
        yield
    finally:
        raw.rollback()
        raw.close()


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("which", [0, -1], ids=["first", "last"])
def test_apply_counts_the_sagas_another_transaction_holds_and_says_to_run_it_again(which):
    """Whether the held saga comes before the one that moves (by id) or after it, the
    command says it stayed behind; the next run moves it."""
    sagas = []
    for _ in range(2):
        with transaction.atomic():
            saga = start()
            out_of_workers_reach(saga.pk)
        sagas.append(saga)
    sagas.sort(key=lambda s: s.pk)
    kept, free = sagas[which], sagas[which + 1]

    with held(kept.pk):
        out = migrate("--apply")
    assert "Moved 1 saga from v1 to v2" in out
    assert (
        "1 saga was held by another transaction (a worker recording a step, say) and stayed "
        "on v1: run the command again." in out
    )
    assert (version_of(kept), version_of(free)) == (1, 2)

    out = migrate("--apply")
    assert "Moved 1 saga from v1 to v2" in out and "held by another transaction" not in out
    assert version_of(kept) == 2


# -- the order saga back to v1: every step row the move removes is named -----------------------
def order_at(owner, sku: str, until_step: str, ops: User | None = None) -> Saga:
    """An order (paid without 3-D Secure: ``confirm_3ds`` passed by) driven in this process
    until its saga stands at ``until_step``; at ``fraud_review`` ops staff approve it."""
    order = place(owner, [(sku, 1)])
    saga = Saga.objects.get(pk=order.saga_id)
    for _ in range(12):
        if saga.current_step == until_step and saga.waiting_since is None:
            return saga
        if saga.current_step == "fraud_review" and saga.waiting_since is not None:
            assert ops is not None
            saga_signal(saga_id=saga.id, name="fraud_review", payload={"approved": True}, user=ops)
        saga = deliver(saga.id)
    raise AssertionError(f"never got to {until_step}: {saga.state} at {saga.current_step}")


def order_migrate(*args: str) -> str:
    out = io.StringIO()
    call_command("saga_migrate", "order", "--from", "2", "--to", "1", *args, stdout=out)
    return out.getvalue()


@pytest.mark.django_db
def test_the_plan_names_every_step_row_a_move_to_v1_removes(ops, settings):
    """v1 has neither ``confirm_3ds`` nor ``fraud_review``: a saga past the first (passed by,
    recorded as skipped) loses its row too, not only the rows of the steps ahead of it, and
    one that ran the review loses that row as well. The plan and each moved saga's timeline
    name every one, with what it recorded."""
    settings.ORDER_FRAUD_REVIEW_ABOVE = "100.00"
    make_product("cheap", price="20.00")
    make_product("dear", price="200.00")
    owner = User.objects.create_user("ada-migrates")
    paying = order_at(owner, "cheap", "authorize_payment")
    capturing = order_at(owner, "dear", "capture_payment", ops)
    assert SagaStep.objects.get(saga_id=paying.id, name="confirm_3ds").result == {"skipped": True}
    assert SagaStep.objects.get(saga_id=capturing.id, name="fraud_review").status == "succeeded"

    plan = order_migrate()
    assert "Will move: 2" in plan
    assert (
        "1  running at authorize_payment (step 3) -> authorize_payment (step 2); "
        "drops confirm_3ds (skipped), fraud_review (not reached)"
    ) in plan
    assert (
        "1  running at capture_payment (step 6) -> capture_payment (step 4); "
        "drops confirm_3ds (skipped), fraud_review (ran)"
    ) in plan

    assert "Moved 2 sagas from v2 to v1" in order_migrate("--apply", "--actor", "user:alice")
    for saga, review in ((paying, "not reached"), (capturing, "ran")):
        names = SagaStep.objects.filter(saga_id=saga.id).order_by("index")
        assert [s.name for s in names] == get_definition("order", 1).names
        moved = Saga.objects.get(pk=saga.pk).events.get(kind="ops_migrate")
        assert moved.detail.endswith(f"; drops confirm_3ds (skipped), fraud_review ({review})")
