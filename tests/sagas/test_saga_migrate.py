"""``manage.py saga_migrate``: plan, apply, refusals and a move racing a running step, against
real workers.

The ``mig`` type (:mod:`tests.sagas.sagatypes`): v1 ``a, go (Wait), b, c``; v2 inserts
``check`` before the wait and ``extra`` after ``b``; v3 drops ``a``'s compensation and renames
the wait. ``c`` is the pivot everywhere.
"""

from __future__ import annotations

import io

import pytest
from django.contrib.auth.models import Group, User
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import transaction
from django.utils import timezone

from audit.models import AuditEntry
from sagas.definition import get_definition
from sagas.models import Saga, SagaState, SagaStep
from sagas.services import saga_start
from sagas.signals import saga_signal
from tests.sagas.sagatypes import effects, ensure_effects_table

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True)]


@pytest.fixture(autouse=True)
def _effects_table(transactional_db):
    ensure_effects_table()


@pytest.fixture
def ops_user(transactional_db) -> User:
    user = User.objects.create_user("ops-migrator", is_staff=True)
    user.groups.add(Group.objects.get(name="ops"))
    return User.objects.get(pk=user.pk)


def start(script=None, version=1) -> Saga:
    with transaction.atomic():
        return saga_start(saga_type="mig", data={"script": script or {}}, version=version)


def row(saga_id) -> Saga:
    return Saga.objects.get(pk=saga_id)


def parked(saga_id, wait_for) -> Saga:
    return wait_for(
        lambda: (s := row(saga_id)).waiting_since is not None and s.current_step == "go" and s,
        timeout=60,
        describe=lambda: Saga.objects.filter(pk=saga_id).values("state", "current_step").first(),
    )


def finished(saga_id, wait_for, states=(SagaState.SUCCEEDED, SagaState.COMPENSATED)) -> Saga:
    return wait_for(
        lambda: (s := row(saga_id)).state in states and s,
        timeout=90,
        describe=lambda: (
            Saga.objects.filter(pk=saga_id)
            .values("state", "current_step", "definition_version", "attempt", "last_error")
            .first()
        ),
    )


def migrate(*args: str) -> str:
    out = io.StringIO()
    call_command("saga_migrate", "mig", *args, stdout=out)
    return out.getvalue()


def did(saga_id) -> set[tuple[str, str]]:
    return set(effects(saga_id))


def test_plan_then_apply_moves_parked_sagas_by_step_name(celery_worker, wait_for, ops_user):
    """The plan changes nothing and says where the sagas land; apply moves them (timeline,
    step rows), after which one goes on through v2's gained step and one, declined, undoes
    exactly the step that took effect."""
    goes_on, declined = start(), start()
    parked(goes_on.id, wait_for), parked(declined.id, wait_for)
    before = row(goes_on.id).version

    plan = migrate("--from", "1", "--to", "2")
    assert "Will move: 2" in plan
    assert "2  running at go (step 2) -> go (step 3); skips check; gains extra" in plan
    assert "Cannot move: 0" in plan
    assert row(goes_on.id).definition_version == 1 and row(goes_on.id).version == before

    alice = User.objects.create_user("alice", is_staff=True)
    out = migrate("--from", "1", "--to", "2", "--apply", "--actor", "user:alice")
    assert "Moved 2 sagas from v1 to v2 (actor user:alice)" in out
    v2 = get_definition("mig", 2)
    moved = row(goes_on.id)
    assert (moved.definition_version, moved.definition_fingerprint) == (2, v2.fingerprint)
    assert (moved.current_step, moved.step_index, moved.version) == ("go", 2, before + 1)
    steps = SagaStep.objects.filter(saga_id=goes_on.id).order_by("index")
    assert [s.name for s in steps] == ["a", "check", "go", "b", "extra", "c"]
    event = moved.events.get(kind="ops_migrate")
    assert event.actor == "user:alice" and event.step == "go"
    assert "v1 -> v2 at go" in event.detail and "skips check" in event.detail
    # An ops action like any other: one audit entry per moved saga, naming who moved it.
    audit = AuditEntry.objects.filter(action="saga.migrate").order_by("target")
    assert sorted(e.target for e in audit) == sorted(f"saga:{s.id}" for s in (goes_on, declined))
    assert {(e.actor, e.actor_name, e.source) for e in audit} == {(alice, "alice", "cli")}
    assert "v1 -> v2 at go" in audit[0].detail["note"]

    saga_signal(saga_id=goes_on.id, name="go", payload={"ok": True}, user=ops_user)
    saga_signal(saga_id=declined.id, name="go", payload={"ok": False}, user=ops_user)
    assert finished(goes_on.id, wait_for).state == SagaState.SUCCEEDED
    assert did(goes_on.id) == {("a", "do"), ("b", "do"), ("extra", "do"), ("c", "do")}
    assert finished(declined.id, wait_for).state == SagaState.COMPENSATED
    assert did(declined.id) == {("a", "do"), ("a", "undo")}  # "check" never ran: not undone


def test_unsafe_moves_are_refused_with_the_reason(celery_worker, wait_for, settings):
    """v3 has no step "go" and no compensation for "a": parked sagas cannot land, and a saga
    still undoing "a" would lose that undo; nothing moves."""
    at_go = start()
    stuck = start({"b": ["business:no"], "undo:a": ["transient"]})
    parked(at_go.id, wait_for)
    saga_signal(saga_id=stuck.id, name="go", payload={}, user=_ops())
    finished(stuck.id, wait_for, states=(SagaState.NEEDS_MANUAL,))
    assert row(stuck.id).current_step == "a"

    out = migrate("--from", "1", "--to", "3", "--apply")
    assert "Will move: 0" in out and "Cannot move: 2" in out
    assert "1  running at go: its current step go does not exist in v3" in out
    assert "1  needs_manual at a: a took effect and has no compensation in v3" in out
    assert "Moved 0 sagas" in out
    assert {row(at_go.id).definition_version, row(stuck.id).definition_version} == {1}
    assert not Saga.objects.filter(events__kind="ops_migrate").exists()
    assert not AuditEntry.objects.filter(action="saga.migrate").exists()

    with pytest.raises(CommandError, match="no version 9 registered"):
        migrate("--from", "1", "--to", "9")
    with pytest.raises(CommandError, match="both 1"):
        migrate("--from", "1", "--to", "1")
    # An actor the timeline could keep only part of: refused, before anything moves.
    with pytest.raises(CommandError, match="--actor may be at most 150 characters"):
        migrate("--from", "1", "--to", "2", "--apply", "--actor", "x" * 151)
    assert {row(at_go.id).definition_version, row(stuck.id).definition_version} == {1}
    with pytest.raises(
        CommandError, match=r"No saga type 'nosuch' is registered here \(registered: .*mig"
    ):
        call_command("saga_migrate", "nosuch", "--from", "1", "--to", "2", stdout=io.StringIO())


def test_apply_never_moves_a_saga_whose_step_is_in_flight(worker_factory, wait_for):
    """A saga whose step is running (lease held) stays on v1 and is reported; it finishes on
    v1, and the command moves nothing under it."""
    # Step timeouts of 10 s on this worker: b runs 5 s, time enough for a slow test process to
    # see its lease and run the command while it runs.
    worker_factory({"SAGA_STEP_TIMEOUT": "10"}, exclusive=True)
    saga = start({"b": ["slow:5"]})
    parked(saga.id, wait_for)
    saga_signal(saga_id=saga.id, name="go", payload={}, user=_ops())
    wait_for(
        lambda: (
            (s := row(saga.id)).current_step == "b"
            and s.lease_until is not None
            and s.lease_until > timezone.now()
        ),
        timeout=60,
    )
    out = migrate("--from", "1", "--to", "2", "--apply")
    assert "Step in flight now (left for a later run): 1" in out
    assert "1 saga had a step in flight and stayed on v1" in out
    assert row(saga.id).definition_version == 1
    done = finished(saga.id, wait_for)
    assert (done.state, done.definition_version) == (SagaState.SUCCEEDED, 1)
    assert did(saga.id) == {("a", "do"), ("b", "do"), ("c", "do")}
    assert "Will move: 0" in migrate("--from", "1", "--to", "2")


def _ops() -> User:
    user, _ = User.objects.get_or_create(username="ops-migrator-2", defaults={"is_staff": True})
    user.groups.add(Group.objects.get(name="ops"))
    return User.objects.get(pk=user.pk)
