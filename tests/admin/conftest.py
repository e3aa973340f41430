"""Fixtures of the ops console tests: users with and without the ops permission, and sagas in
any state built directly in the database (no worker needed to look at or operate them)."""

from __future__ import annotations

import uuid
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.contrib.auth.models import Group, Permission, User
from django.utils import timezone

from orders.models import Order, OrderItem
from sagas.definition import forward_key, get_definition
from sagas.models import Saga, SagaEvent, SagaState, SagaStep, StepStatus

VIEW = [
    ("sagas", "view_saga"),
    ("orders", "view_order"),
    ("inventory", "view_product"),
    ("inventory", "change_product"),
    ("inventory", "view_reservation"),
    ("payments", "view_payment"),
    ("shipping", "view_shipment"),
]


def _staff(username: str, *, ops: bool) -> User:
    user = User.objects.create_user(username, password="pw", is_staff=True)
    for app_label, codename in VIEW:
        user.user_permissions.add(
            Permission.objects.get(content_type__app_label=app_label, codename=codename)
        )
    if ops:
        user.groups.add(Group.objects.get(name="ops"))
    return User.objects.get(pk=user.pk)


@pytest.fixture
def ops_user(db) -> User:
    """Support staff in the "ops" group: may look and operate."""
    return _staff("ops-olga", ops=True)


@pytest.fixture
def viewer(db) -> User:
    """Staff who may look at sagas but not operate them."""
    return _staff("viewer-vic", ops=False)


@pytest.fixture
def ops_client(client, ops_user):
    client.force_login(ops_user)
    return client


@pytest.fixture
def viewer_client(client, viewer):
    client.force_login(viewer)
    return client


def make_saga(
    *,
    state: str = SagaState.SUCCEEDED,
    saga_type: str = "test5",
    step_index: int = 4,
    failed_step: str = "",
    failure_code: str = "",
    failed_undo: str = "",
    last_error: str = "",
    escalated_from: str = "",
    attempt: int = 0,
    next_attempt_at=None,
    age: timedelta | None = None,
    events: int = 3,
    with_order: bool = False,
    correlation_id: str = "",
) -> Saga:
    """A saga row as the engine would leave it in ``state``, with steps and a short timeline.

    Steps before ``step_index`` took effect (their results are in ``saga.results``); the step
    at ``step_index`` has been attempted ``attempt`` times when the saga is running.
    """
    definition = get_definition(saga_type)
    saga_id = uuid.uuid4()
    names = [s.name for s in definition.steps]
    took = names[:step_index] if state != SagaState.SUCCEEDED else names
    saga = Saga.objects.create(
        id=saga_id,
        saga_type=saga_type,
        state=state,
        current_step=names[step_index],
        step_index=step_index,
        attempt=attempt,
        next_attempt_at=next_attempt_at,
        failed_step=failed_step,
        failure_code=failure_code,
        failed_undo=failed_undo,
        last_error=last_error,
        escalated_from=escalated_from,
        results={name: {"ok": True} for name in took},
        data={"script": {}},
        correlation_id=correlation_id,
    )
    steps = []
    for i, name in enumerate(names):
        if name in took:
            status = StepStatus.SUCCEEDED
        elif i == step_index and attempt:
            status = StepStatus.RETRYING
        else:
            status = StepStatus.PENDING
        steps.append(
            SagaStep(
                saga=saga,
                index=i,
                name=name,
                status=status,
                attempts=1 if name in took else (attempt if i == step_index else 0),
                idempotency_key=forward_key(saga_id, name),
                result={"ok": True} if name in took else None,
                took_effect=name in took,
                maybe_effect=i == step_index and attempt > 0,
            )
        )
    SagaStep.objects.bulk_create(steps)
    now = timezone.now()
    SagaEvent.objects.bulk_create(
        SagaEvent(
            saga=saga,
            at=now + timedelta(milliseconds=k),
            kind="started" if k == 0 else "step_succeeded",
            step="" if k == 0 else names[min(k - 1, len(names) - 1)],
            attempt=0 if k == 0 else 1,
            detail=f"event {k}",
            duration_ms=None if k == 0 else 2.5,
        )
        for k in range(events)
    )
    if age is not None:
        Saga.objects.filter(pk=saga.pk).update(created_at=now - age)
    if with_order:
        owner, _ = User.objects.get_or_create(username="customer-cora")
        order = Order.objects.create(
            owner=owner,
            currency="EUR",
            total=Decimal("24.00"),
            payment_method="pm_card_visa",
            shipping_name="Cora Customer",
            shipping_line1="1 Test Street",
            shipping_city="Berlin",
            shipping_postal_code="10115",
            shipping_country="DE",
            saga=saga,
        )
        OrderItem.objects.create(order=order, sku="SR-MUG", quantity=2, unit_price=Decimal("12"))
    return Saga.objects.get(pk=saga.pk)


def needs_manual(**kwargs: Any) -> Saga:
    """Stopped mid-compensation: the undo of s1 kept failing (``failed_undo`` defaults to the
    given ``failed_step``)."""
    kwargs.setdefault("failed_undo", kwargs.get("failed_step", "s1"))
    defaults = dict(
        state=SagaState.NEEDS_MANUAL,
        step_index=0,
        failed_step="s1",
        failure_code="no",
        last_error="compensation failed: ConnectionError: provider down",
        escalated_from=SagaState.COMPENSATING,
    )
    return make_saga(**{**defaults, **kwargs})


def running(**kwargs: Any) -> Saga:
    """Retrying s3 after a transient error; s1 and s2 took effect."""
    defaults = dict(
        state=SagaState.RUNNING,
        step_index=2,
        attempt=2,
        last_error="ConnectionError: scripted transient error at s3",
        next_attempt_at=timezone.now() + timedelta(minutes=5),
    )
    return make_saga(**{**defaults, **kwargs})


def stuck(**kwargs: Any) -> Saga:
    """Like :func:`running`, but overdue for an hour with no worker holding it."""
    return running(next_attempt_at=timezone.now() - timedelta(hours=1), **kwargs)
