"""The one mapping from a saga to what a client sees of its order.

The client-facing status is derived from the saga, here and only here. The model's
properties, the serializers, the admin and ``check_invariants`` all use :func:`order_state`
(for one order) or :func:`order_status_expression` (for a queryset: filter or annotate in
SQL), which are built from the same table, :data:`STATUS_BY_SAGA_STATE`. It depends on the
saga model only, so ``orders.models`` can use it without importing back.
"""

from __future__ import annotations

from dataclasses import dataclass

from django.db.models import Case, CharField, Q, Value, When

from sagas.models import Saga, SagaState

#: Every ``cancellation_reason`` a client may read (the API's enum).
CANCELLATION_REASONS = (
    "out_of_stock",
    "payment_declined",
    "shipping_unavailable",
    "customer_cancelled",
    "timed_out",
    "step_failed",
    "fraud_rejected",
)


class OrderStatus:
    PROCESSING = "processing"
    #: The saga waits for a signal from the client (a 3-D Secure confirmation).
    REQUIRES_ACTION = "requires_action"
    CONFIRMED = "confirmed"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    NEEDS_ATTENTION = "needs_attention"

    ALL = (PROCESSING, REQUIRES_ACTION, CONFIRMED, CANCELLING, CANCELLED, NEEDS_ATTENTION)
    #: An order in one of these will not move again without a person.
    SETTLED = (CONFIRMED, CANCELLED, NEEDS_ATTENTION)


#: Saga state -> order status. A running saga with a cancel requested is ``cancelling``
#: (see :func:`order_state`): the client asked, and the engine honours it at the next step
#: boundary, so showing ``processing`` would contradict the ``202`` they just got.
STATUS_BY_SAGA_STATE: dict[str, str] = {
    SagaState.RUNNING: OrderStatus.PROCESSING,
    SagaState.COMPENSATING: OrderStatus.CANCELLING,
    SagaState.SUCCEEDED: OrderStatus.CONFIRMED,
    SagaState.COMPENSATED: OrderStatus.CANCELLED,
    SagaState.NEEDS_MANUAL: OrderStatus.NEEDS_ATTENTION,
    # A person closed it by hand: final for the client. Stopped while undoing or before its
    # pivot, the order is cancelled (with its reason); stopped at or past its pivot, it is
    # confirmed (see RESOLVED_PAST_PIVOT). Either way the saga's on_resolve settled its stock.
    SagaState.RESOLVED: OrderStatus.CANCELLED,
}
#: A resolved saga that had escalated while running forward at or past its pivot is confirmed.
#: One that stopped going forward before it (a wait that timed out) was given up: resolving it
#: sets its ``failure_code`` (``timed_out``), which is how the two are told apart.
RESOLVED_PAST_PIVOT = OrderStatus.CONFIRMED


def client_signals() -> tuple[str, ...]:
    """The signals an order saga (any registered version) waits for from its client: waiting
    for one is ``requires_action`` (the client has something to do), not ``processing``."""
    from sagas.definition import registered_definitions

    names: list[str] = []
    for definition in registered_definitions():
        if definition.saga_type != "order":
            continue
        for step in definition.steps:
            park = step.park
            if park is not None and park.client is not None and park.signal not in names:
                names.append(park.signal)
    return tuple(names)


@dataclass(frozen=True)
class OrderState:
    """What a client sees of an order's progress."""

    status: str
    #: The forward step being run, only while ``processing``.
    step: str | None
    #: Why it is (being) cancelled: a business code, ``customer_cancelled``, ``timed_out`` or
    #: ``step_failed``. Set when ``cancelled``, when ``cancelling`` once the reason is known, and
    #: when ``needs_attention`` because undoing the order got stuck.
    cancellation_reason: str | None


def order_status(
    *,
    saga_state: str,
    cancel_reason: str = "",
    escalated_from: str = "",
    waiting_for: str = "",
    failure_code: str = "",
) -> str:
    """The order status for a saga state: the client's view of the saga."""
    if (
        saga_state == SagaState.RESOLVED
        and escalated_from == SagaState.RUNNING
        and not failure_code
    ):
        return RESOLVED_PAST_PIVOT
    status = STATUS_BY_SAGA_STATE[saga_state]
    if status == OrderStatus.PROCESSING and cancel_reason:
        return OrderStatus.CANCELLING
    if status == OrderStatus.PROCESSING and waiting_for and waiting_for in client_signals():
        return OrderStatus.REQUIRES_ACTION
    return status


def order_state(saga: Saga) -> OrderState:
    """Status, step and cancellation reason of the order whose saga this is."""
    status = order_status(
        saga_state=saga.state,
        cancel_reason=saga.cancel_reason,
        escalated_from=saga.escalated_from,
        waiting_for=saga.waiting_for,
        failure_code=saga.failure_code,
    )
    if status in (OrderStatus.PROCESSING, OrderStatus.REQUIRES_ACTION):
        return OrderState(status=status, step=saga.current_step or None, cancellation_reason=None)
    if status == OrderStatus.CANCELLED:
        return OrderState(status=status, step=None, cancellation_reason=saga.failure_code or None)
    if status == OrderStatus.CANCELLING:
        reason = saga.failure_code or saga.cancel_reason or None
        return OrderState(status=status, step=None, cancellation_reason=reason)
    if status == OrderStatus.NEEDS_ATTENTION:
        # Stuck while undoing: keep telling the client why it was being cancelled. (A saga that
        # needs a person after its pivot was never cancelled: no failure_code, no reason.)
        return OrderState(status=status, step=None, cancellation_reason=saga.failure_code or None)
    return OrderState(status=status, step=None, cancellation_reason=None)


def order_status_expression(prefix: str = "saga__") -> Case:
    """The same mapping as a SQL expression, to filter or annotate orders by status.

    ``Order.objects.annotate(status=order_status_expression()).filter(status="cancelled")``.
    ``prefix`` is the path from the queried model to the saga.
    """
    whens = [
        When(
            Q(**{f"{prefix}state": SagaState.RUNNING}) & ~Q(**{f"{prefix}cancel_reason": ""}),
            then=Value(OrderStatus.CANCELLING),
        ),
        When(
            Q(**{f"{prefix}state": SagaState.RESOLVED})
            & Q(**{f"{prefix}escalated_from": SagaState.RUNNING})
            & Q(**{f"{prefix}failure_code": ""}),
            then=Value(RESOLVED_PAST_PIVOT),
        ),
        When(
            Q(**{f"{prefix}state": SagaState.RUNNING})
            & Q(**{f"{prefix}waiting_for__in": client_signals()}),
            then=Value(OrderStatus.REQUIRES_ACTION),
        ),
    ]
    whens += [
        When(Q(**{f"{prefix}state": state}), then=Value(status))
        for state, status in STATUS_BY_SAGA_STATE.items()
    ]
    return Case(*whens, output_field=CharField())
