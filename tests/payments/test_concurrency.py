"""Races at the provider: each thread has its own connection and its own transaction."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest
from django.db import connection

from payments.errors import PaymentDeclined, PaymentRefused, PaymentStateConflict
from payments.models import Payment, ProviderAuthorization
from payments.provider import FakePaymentProvider
from payments.selectors import provider_summary
from payments.services import payment_authorize, payment_capture, payment_refund, payment_void

pytestmark = pytest.mark.django_db(transaction=True)


def run_together(*calls: Callable[[], Any]) -> list[Any]:
    """Start every call at the same moment on its own thread; return results or exceptions."""
    barrier = threading.Barrier(len(calls))
    outcomes: list[Any] = [None] * len(calls)

    def run(i: int, call: Callable[[], Any]) -> None:
        try:
            barrier.wait(timeout=10)
            outcomes[i] = call()
        except Exception as exc:  # noqa: BLE001 - the outcome is what the test inspects
            outcomes[i] = exc
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads), "a racing call never finished"
    return outcomes


def authorize(order_id: uuid.UUID) -> dict:
    return payment_authorize(
        key="k",
        order_id=order_id,
        amount=Decimal("10.00"),
        currency="EUR",
        payment_method="pm_card_visa",
    )


def test_same_key_racing_authorizes_once():
    """Four deliveries of one authorize race: one authorization, one answer, one Payment."""
    order_id = uuid.uuid4()
    outcomes = run_together(*[(lambda: authorize(order_id)) for _ in range(4)])
    assert all(isinstance(o, dict) for o in outcomes), outcomes
    assert len({o["authorization_id"] for o in outcomes}) == 1
    assert ProviderAuthorization.objects.count() == 1
    assert Payment.objects.get(order_id=order_id).authorized_amount == Decimal("10.00")


def test_void_racing_its_authorize_leaves_no_open_hold():
    """Whichever of authorize and void lands first, no authorization stays open."""
    order_id = uuid.uuid4()
    auth_outcome, void_outcome = run_together(
        lambda: authorize(order_id),
        lambda: payment_void(key="k:undo", order_id=order_id, forward_key="k"),
    )
    assert isinstance(void_outcome, dict), void_outcome
    if isinstance(auth_outcome, PaymentRefused):
        assert void_outcome["undone"] is False
        assert not ProviderAuthorization.objects.exists()
    else:
        assert isinstance(auth_outcome, dict), auth_outcome
        assert void_outcome["undone"] is True
    assert provider_summary(order_id=order_id)["open_authorization"] is False


def capture(order_id: uuid.UUID) -> dict:
    return payment_capture(key="c", order_id=order_id, authorize_key="k")


def test_same_key_racing_captures_once():
    """Four deliveries of one capture race: one capture, and every delivery gets its answer."""
    order_id = uuid.uuid4()
    authorize(order_id)
    outcomes = run_together(*[(lambda: capture(order_id)) for _ in range(4)])
    assert all(isinstance(o, dict) for o in outcomes), outcomes
    assert len({o["capture_id"] for o in outcomes}) == 1
    summary = provider_summary(order_id=order_id)
    assert (summary["captures"], summary["captured_minor"]) == (1, 1000)
    assert Payment.objects.get(order_id=order_id).captured_amount == Decimal("10.00")


def test_refund_racing_its_capture_leaves_no_money_taken():
    """Whichever of capture and refund lands first, no money stays captured: the refund gives
    it back, or its tombstone refuses the late capture."""
    order_id = uuid.uuid4()
    authorize(order_id)
    capture_outcome, refund_outcome = run_together(
        lambda: capture(order_id),
        lambda: payment_refund(key="c:undo", order_id=order_id, forward_key="c"),
    )
    assert isinstance(refund_outcome, dict), refund_outcome
    summary = provider_summary(order_id=order_id)
    if isinstance(capture_outcome, PaymentRefused):
        assert refund_outcome["undone"] is False
        assert (summary["captures"], summary["status"]) == (0, "authorized")
    else:
        assert isinstance(capture_outcome, dict), capture_outcome
        assert refund_outcome["undone"] is True
        assert summary["refunded_minor"] == summary["captured_minor"] == 1000


def test_a_void_racing_a_capture_leaves_one_outcome():
    """The capture's write waits on the authorization's lock while a void holds it (or the
    other way round): exactly one of the two takes effect, and the ledger agrees with it."""
    provider = FakePaymentProvider()
    for n in range(5):
        auth = provider.authorize(
            key=f"a{n}",
            reference=f"o{n}",
            amount_minor=1000,
            currency="EUR",
            payment_method="pm_card_visa",
        )
        capture, void = run_together(
            lambda auth=auth, n=n: provider.capture(key=f"c{n}", authorization_id=auth["id"]),
            lambda n=n: provider.void(key=f"a{n}:undo", authorize_key=f"a{n}"),
        )
        stored = ProviderAuthorization.objects.get(id=auth["id"])
        if isinstance(capture, dict):
            assert isinstance(void, PaymentStateConflict), void
            assert (stored.status, stored.captured_minor) == ("captured", 1000)
            assert provider.lookup(f"c{n}")["outcome"] == "succeeded"
        else:
            assert isinstance(capture, PaymentDeclined), capture
            assert capture.decline_code == "authorization_voided"
            assert isinstance(void, dict) and void["undone"] is True, void
            assert (stored.status, stored.captured_minor) == ("voided", 0)
            assert provider.lookup(f"c{n}")["outcome"] == "declined"
