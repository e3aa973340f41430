"""The next version of the order saga, for the chaos run's deploy halfway through.

It is the newest order saga with a read-only ``screen_order`` step inserted after
``authorize_payment`` (it reads the order and takes no effect, so it has nothing to undo): a
new shape, so a new version, registered beside the others. The chaos run starts every
process without it, and halfway through creates the flag file named by
``SAGARUNNER_ORDER_NEXT_FLAG`` and restarts its workers, beat and web (gunicorn's graceful
reload) one after the other, like a rolling deploy: from then on new orders start on this
version while those in flight finish on theirs.
"""

from __future__ import annotations

import os
from dataclasses import fields
from pathlib import Path

from orders.models import Order
from orders.saga import order_saga
from sagas.public import SagaDefinition, Step, StepContext, register

FLAG_ENV = "SAGARUNNER_ORDER_NEXT_FLAG"


def screen_order(ctx: StepContext) -> dict:
    """A look at the order before the carrier is booked; takes no effect."""
    total = Order.objects.values_list("total", flat=True).get(id=ctx.data["order_id"])
    return {"screened": True, "total": str(total)}


_at = order_saga.index_of("authorize_payment") + 1
# Everything else as the newest version has it (deadline, on_resolve, the change hook, ...).
_same = {
    f.name: getattr(order_saga, f.name)
    for f in fields(SagaDefinition)
    if f.init and f.name not in ("saga_type", "steps", "version", "_index")
}
order_saga_next = SagaDefinition(
    "order",
    version=order_saga.version + 1,
    # A read of this database only: its claim need not wait for the disk.
    steps=[
        *order_saga.steps[:_at],
        Step("screen_order", screen_order, stays_in_database=True),
        *order_saga.steps[_at:],
    ],
    **_same,
)


def deployed() -> bool:
    flag = os.environ.get(FLAG_ENV, "")
    return bool(flag) and Path(flag).exists()


if deployed():
    register(order_saga_next)
