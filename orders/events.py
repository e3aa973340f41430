"""What a client is told when its order changes: the order saga's change hook.

The engine calls :data:`order_events` inside the transaction of every record of an order
saga (and the ops operations call it inside theirs), with the saga before and after. When the
order as its client sees it changed, an event goes to the webhooks outbox in that same
transaction: ``order.confirmed``, ``order.cancelled``, ``order.needs_attention`` when the
order settles so, ``order.updated`` for any other visible change. Its ``data`` is the order
exactly as ``GET /orders/{id}/`` shows it.

What the client sees changes with its status, step and cancellation reason, and with its
saga's state and current step, which the order shows too: the payment's amounts and the
shipment are changed by steps and undos, and the record of one that ends moves the saga on.
So while the order is ``cancelling`` (its status and step the same until it is cancelled),
each undo that ends is an ``order.updated`` with the shipment cancelled or the money voided or
refunded, which a client mirroring the order from its events must learn. A retry moves
nothing and sends nothing (an attempt that got no answer may have changed the payment
already: the attempt that gets its answer ends the step and tells); a redelivered step is
fenced off before its record, so nothing is sent twice.

Cheap when nobody listens: an order records in its saga's ``data`` whether its client had a
webhook endpoint when it was placed (``webhooks``), and :meth:`OrderEvents.wants` reads only
that, so the sagas of clients without endpoints never pay a query or a transaction for this.
A client that gains an endpoint later has the flag set on its orders still in flight
(:func:`flag_in_flight_orders`), so their changes from then on are delivered too.
"""

from __future__ import annotations

from typing import Any

from orders.models import Order
from orders.representation import OrderSerializer, attach_payments_and_shipments
from orders.selectors import order_state
from sagas.models import Saga
from sagas.public import saga_data_flag
from webhooks.services import event_emit

#: Saga ``data`` key: the client had an endpoint when the order was placed.
DATA_KEY = "webhooks"

_SETTLED_EVENTS = {
    "confirmed": "order.confirmed",
    "cancelled": "order.cancelled",
    "needs_attention": "order.needs_attention",
}


class OrderEvents:
    """The order saga's :class:`~sagas.definition.ChangeHook`."""

    def wants(self, saga: Saga) -> bool:
        return bool(saga.data.get(DATA_KEY))

    def __call__(self, before: Saga, after: Saga) -> None:
        old, new = order_state(before), order_state(after)
        if old == new and (before.state, before.current_step) == (after.state, after.current_step):
            return
        event_type = "order.updated"
        if new.status != old.status:
            event_type = _SETTLED_EVENTS.get(new.status, event_type)
        order = Order.objects.prefetch_related("items").filter(saga_id=after.id).first()
        if order is None:  # the saga is being started with its order, not changed
            return
        order.saga = after
        attach_payments_and_shipments([order])
        event_emit(
            owner_id=order.owner_id,
            subject=order.id,
            type=event_type,
            data=OrderSerializer(order).data,
        )


order_events = OrderEvents()


def flag_in_flight_orders(sender: Any, *, owner_id: Any, **_: Any) -> None:
    """``webhooks.signals.subscribed``: the client has an endpoint now; its orders still in
    flight start telling the outbox about their changes (connected in ``OrdersConfig``)."""
    saga_data_flag(saga_ids=Order.objects.filter(owner_id=owner_id).values("saga_id"), key=DATA_KEY)
