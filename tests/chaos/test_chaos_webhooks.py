"""The chaos run's check of guarantee 7 (``lab.chaos_webhooks.check``) on received deliveries
made up here: what it must report, so a quick chaos run's "0 violations" means something."""

from __future__ import annotations

import pytest

from lab import chaos_webhooks


def _event(event_id: str, order: str, sequence: int, status: str, type_: str) -> dict:
    return {
        "id": event_id,
        "type": type_,
        "sequence": sequence,
        "data": {"id": order, "status": status},
    }


@pytest.fixture
def receivers():
    r = chaos_webhooks.start()
    yield r
    r.close()


def test_every_committed_event_and_only_those_must_have_arrived(receivers):
    finals = {"o1": (0, "confirmed")}
    committed = {"e1": 0, "e2": 0, "e3": 0, "e4": 0}
    receivers.received += [
        (0, _event("e1", "o1", 1, "processing", "order.updated")),
        (0, _event("e2", "o1", 2, "confirmed", "order.confirmed")),
        (0, _event("e2", "o1", 2, "confirmed", "order.confirmed")),  # a redelivery: fine
        # e3 never arrived; e4 went to another client; e9 was never committed (rolled back).
        (1, _event("e4", "o1", 3, "confirmed", "order.updated")),
        (0, _event("e9", "o1", 4, "cancelling", "order.updated")),
    ]

    violations = chaos_webhooks.check(receivers, finals, wait=0.0, committed=committed)

    assert sorted(violations) == sorted(
        [
            "[webhooks] event e3 was committed but never reached client 0",
            "[webhooks] event e4 was committed but never reached client 0",
            "[webhooks] order o1: delivered to client 1",
            "[webhooks] event e9 arrived, but no committed change wrote it",
        ]
    )


def test_all_committed_events_arrived_is_clean(receivers):
    receivers.received += [
        (0, _event("e1", "o1", 1, "processing", "order.updated")),
        (0, _event("e2", "o1", 2, "cancelled", "order.cancelled")),
    ]
    violations = chaos_webhooks.check(
        receivers, {"o1": (0, "cancelled")}, wait=0.0, committed={"e1": 0, "e2": 0}
    )
    assert violations == []
