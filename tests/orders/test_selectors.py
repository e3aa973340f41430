"""The client's view of an order is derived from its saga, by one mapping."""

from __future__ import annotations

import pytest

from orders.models import Order
from orders.selectors import OrderStatus, order_state, order_status_expression
from sagas.models import Saga, SagaState

from .conftest import make_product, place

EXPECTED = [
    # (saga state, cancel_reason, failure_code) -> (status, step, cancellation_reason)
    ((SagaState.RUNNING, "", ""), (OrderStatus.PROCESSING, "authorize_payment", None)),
    (
        (SagaState.RUNNING, "customer_cancelled", ""),
        (OrderStatus.CANCELLING, None, "customer_cancelled"),
    ),
    (
        (SagaState.COMPENSATING, "", "payment_declined"),
        (OrderStatus.CANCELLING, None, "payment_declined"),
    ),
    ((SagaState.SUCCEEDED, "", ""), (OrderStatus.CONFIRMED, None, None)),
    (
        (SagaState.COMPENSATED, "", "out_of_stock"),
        (OrderStatus.CANCELLED, None, "out_of_stock"),
    ),
    (
        (SagaState.COMPENSATED, "customer_cancelled", "customer_cancelled"),
        (OrderStatus.CANCELLED, None, "customer_cancelled"),
    ),
    (
        (SagaState.NEEDS_MANUAL, "", "shipping_unavailable"),
        (OrderStatus.NEEDS_ATTENTION, None, "shipping_unavailable"),
    ),
    # Closed by a person: a final status (its stock was settled when it was resolved).
    (
        (SagaState.RESOLVED, "", "shipping_unavailable"),
        (OrderStatus.CANCELLED, None, "shipping_unavailable"),
    ),
    # Needing a person after the pivot: the order was never being cancelled.
    ((SagaState.NEEDS_MANUAL, "", ""), (OrderStatus.NEEDS_ATTENTION, None, None)),
]


@pytest.mark.parametrize(("saga_fields", "expected"), EXPECTED)
def test_order_state_follows_the_saga(saga_fields, expected):
    """Each saga state maps to the documented order status, step and reason."""
    state, cancel_reason, failure_code = saga_fields
    saga = Saga(
        state=state,
        current_step="authorize_payment",
        cancel_reason=cancel_reason,
        failure_code=failure_code,
    )
    got = order_state(saga)
    assert (got.status, got.step, got.cancellation_reason) == expected


@pytest.mark.django_db
def test_the_sql_expression_agrees_with_the_python_mapping(customer):
    """Filtering orders by status in SQL gives the same answer as the property, per state."""
    make_product("lamp", stock=100)
    for (state, cancel_reason, failure_code), _ in EXPECTED:
        order = place(customer, [("lamp", 1)])
        Saga.objects.filter(pk=order.saga_id).update(
            state=state, cancel_reason=cancel_reason, failure_code=failure_code
        )

    annotated = Order.objects.select_related("saga").annotate(derived=order_status_expression())
    assert len(annotated) == len(EXPECTED)
    for order in annotated:
        assert order.derived == order.status
