"""What a client reads in its order's timeline: the same events, in customer-safe words.

Staff see every event as the engine and the operators wrote it (``GET /orders/{id}/timeline/``
as staff, the ops console). The order's own client sees each event with a fixed sentence
per kind instead of the recorded detail, because details carry what a customer must not read:
the note a support person typed, a provider's error text, internal ids and keys. Operators
appear as ``support``, the client itself as ``customer``, the engine and its sweeper as
``system``. Only codes a client already gets as ``cancellation_reason`` are repeated.
"""

from __future__ import annotations

from typing import Any

from orders.status import CANCELLATION_REASONS

#: Kind -> the sentence a client reads. A kind missing here reads as a plain update.
CUSTOMER_WORDS: dict[str, str] = {
    "started": "Order received",
    "step_succeeded": "Step completed",
    "step_retry": "A temporary problem; trying again shortly",
    "parked": "A service this order needs is unavailable; the order waits and goes on after",
    "step_failed": "This step could not be completed",
    "waiting": "Waiting for a confirmation",
    "wait_timed_out": "The confirmation did not arrive in time",
    "signal_received": "Confirmation received",
    "ops_signal": "Reviewed by our support team",
    "cancel_requested": "Cancellation requested",
    "cancel_honoured": "Cancelling the order",
    "compensation_started": "Undoing what was done so far",
    "compensation_succeeded": "Step undone",
    "compensation_retry": "A temporary problem while undoing; trying again shortly",
    "compensation_failed": "This step could not be undone automatically",
    "compensated": "Order cancelled",
    "succeeded": "Order confirmed",
    "needs_manual": "Our support team is looking at this order",
    "ops_retry": "Our support team retried the order",
    "ops_compensate": "Our support team cancelled the order",
    "ops_undo_done": "Our support team completed this step by hand",
    "ops_resolve": "Our support team closed the order",
    "ops_migrate": "Order updated",
}
UPDATE = "Order updated"
#: Kinds whose detail is ``reason: <code>``: a public cancellation reason is kept.
_WITH_REASON = {"cancel_requested", "cancel_honoured", "compensation_started", "compensated"}


def customer_actor(actor: str, *, customer: str) -> str:
    """``customer`` for the client itself, ``support`` for any person on staff, else system."""
    if actor == customer:
        return "customer"
    if actor.startswith("user:") or actor == "system":
        return "support"
    return "system"


def customer_event(event: dict[str, Any], *, customer: str) -> dict[str, Any]:
    """One serialized timeline event (``at``, ``kind``, ``step``, ``attempt``, ``detail``,
    ``actor``) as the order's client may read it; ``customer`` is its own ``user:<name>``."""
    kind = event["kind"]
    detail = CUSTOMER_WORDS.get(kind, UPDATE)
    if kind in _WITH_REASON:
        reason = (event.get("detail") or "").removeprefix("reason: ").strip()
        if reason in CANCELLATION_REASONS:
            detail = f"{detail} ({reason})"
    return {**event, "detail": detail, "actor": customer_actor(event["actor"], customer=customer)}
