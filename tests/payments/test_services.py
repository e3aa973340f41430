"""Our side of payments: what the saga calls, and the ``Payment`` row it keeps in step."""

from __future__ import annotations

import json
import uuid
from decimal import Decimal

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from payments.errors import (
    PaymentDeclined,
    PaymentRefused,
    PaymentStateConflict,
    ProviderUnavailable,
)
from payments.models import Payment, PaymentStatus, ProviderAuthorization
from payments.selectors import provider_summary
from payments.services import payment_authorize, payment_capture, payment_refund, payment_void

pytestmark = pytest.mark.django_db

AUTH = "saga:s:authorize_payment"
CAPTURE = "saga:s:capture_payment"


@pytest.fixture
def order_id() -> uuid.UUID:
    return uuid.uuid4()


def authorize(order_id, pm="pm_card_visa", amount="49.90", key=AUTH, currency="EUR"):
    return payment_authorize(
        key=key, order_id=order_id, amount=Decimal(amount), currency=currency, payment_method=pm
    )


def capture(order_id, key=CAPTURE):
    return payment_capture(key=key, order_id=order_id, authorize_key=AUTH)


def void(order_id):
    return payment_void(key=f"{AUTH}:undo", order_id=order_id, forward_key=AUTH)


def refund(order_id):
    return payment_refund(key=f"{CAPTURE}:undo", order_id=order_id, forward_key=CAPTURE)


def payment(order_id) -> Payment:
    return Payment.objects.get(order_id=order_id)


def test_authorize_records_the_hold_as_decimal(order_id):
    """An approved authorization shows on our Payment as Decimal amounts; the result is JSON."""
    result = authorize(order_id)
    assert result["authorization_id"].startswith("auth_")
    assert result["amount"] == "49.90" and result["currency"] == "EUR"
    assert json.loads(json.dumps(result)) == result
    p = payment(order_id)
    assert p.status == PaymentStatus.AUTHORIZED
    assert p.amount == p.authorized_amount == Decimal("49.90")
    assert isinstance(p.authorized_amount, Decimal)
    assert p.captured_amount == p.voided_amount == p.refunded_amount == Decimal("0")
    assert ProviderAuthorization.objects.get().amount_minor == 4990


def test_authorize_accepts_the_order_id_as_a_string(order_id):
    """Saga data carries ids as strings."""
    authorize(str(order_id))
    assert payment(order_id).status == PaymentStatus.AUTHORIZED


def test_repeated_authorize_counts_once(order_id):
    """The same key again returns the same authorization and our amounts do not double."""
    first = authorize(order_id)
    assert authorize(order_id) == first
    assert payment(order_id).authorized_amount == Decimal("49.90")
    assert provider_summary(order_id=order_id)["authorizations"] == 1


def test_float_amounts_are_refused(order_id):
    """Money is Decimal: a float amount never reaches the provider."""
    with pytest.raises(TypeError):
        payment_authorize(
            key=AUTH, order_id=order_id, amount=49.9, currency="EUR", payment_method="pm_card_visa"
        )
    assert not ProviderAuthorization.objects.exists()


def test_declined_card(order_id):
    """``pm_card_declined``: PaymentDeclined (code payment_declined), Payment marked declined,
    and the same answer on a repeat."""
    with pytest.raises(PaymentDeclined) as caught:
        authorize(order_id, pm="pm_card_declined")
    assert caught.value.code == "payment_declined"
    p = payment(order_id)
    assert (p.status, p.decline_code, p.authorized_amount) == ("declined", "card_declined", 0)
    with pytest.raises(PaymentDeclined):
        authorize(order_id, pm="pm_card_declined")


def test_unknown_payment_method_is_declined(order_id):
    """A payment method nobody knows is a decline."""
    with pytest.raises(PaymentDeclined):
        authorize(order_id, pm="pm_card_unknown")


def test_capture_takes_the_authorized_amount_once(order_id):
    """Capture moves the whole amount; a repeat neither captures nor counts twice."""
    authorize(order_id)
    first = capture(order_id)
    assert first["capture_id"].startswith("cap_") and first["amount"] == "49.90"
    assert capture(order_id) == first
    p = payment(order_id)
    assert p.status == PaymentStatus.CAPTURED
    assert p.captured_amount == Decimal("49.90") and p.capture_id == first["capture_id"]
    assert provider_summary(order_id=order_id)["captures"] == 1


def test_capture_declined_card(order_id):
    """``pm_card_capture_declined``: the authorization holds, the capture is declined, and the
    void that follows releases the hold."""
    authorize(order_id, pm="pm_card_capture_declined")
    with pytest.raises(PaymentDeclined) as caught:
        capture(order_id)
    assert caught.value.code == "payment_declined"
    assert caught.value.decline_code == "capture_declined"
    assert payment(order_id).status == PaymentStatus.AUTHORIZED
    assert void(order_id)["undone"] is True
    p = payment(order_id)
    assert p.status == PaymentStatus.VOIDED and p.voided_amount == Decimal("49.90")
    assert provider_summary(order_id=order_id)["open_authorization"] is False


def test_capture_without_an_authorization_is_declined(order_id):
    """Nothing held, nothing to take: a definite decline rather than a retry loop."""
    with pytest.raises(PaymentDeclined) as caught:
        capture(order_id)
    assert caught.value.decline_code == "no_authorization"


def test_capture_of_another_orders_authorization_is_refused(order_id):
    """A capture never takes money held for a different order."""
    authorize(order_id)
    with pytest.raises(PaymentStateConflict):
        payment_capture(key=CAPTURE, order_id=uuid.uuid4(), authorize_key=AUTH)


def test_capture_given_the_authorizations_id_does_not_ask_the_provider_about_the_authorize(
    order_id,
):
    """The order saga holds the authorize's answer: its authorization is captured as named,
    and the provider is not asked what the authorize key did (a call fewer per order)."""
    authorization_id = authorize(order_id)["authorization_id"]
    with CaptureQueriesContext(connection) as queries:
        result = payment_capture(
            key=CAPTURE, order_id=order_id, authorize_key=AUTH, authorization_id=authorization_id
        )
    assert result["authorization_id"] == authorization_id and result["amount"] == "49.90"
    assert payment(order_id).status == "captured"
    looked_up = [q for q in queries if "provideroperation" in q["sql"] and AUTH in q["sql"]]
    assert looked_up == []


def test_void_releases_the_hold(order_id):
    """Void: status voided, voided amount is the authorized amount, repeat changes nothing."""
    authorize(order_id)
    first = void(order_id)
    assert first["undone"] is True and first["amount"] == "49.90"
    assert void(order_id) == first
    p = payment(order_id)
    assert (p.status, p.voided_amount, p.captured_amount) == ("voided", Decimal("49.90"), 0)


def test_void_with_nothing_to_void_refuses_a_late_authorize(order_id):
    """A void before any authorize succeeds, and the authorize that arrives later is refused."""
    result = void(order_id)
    assert result["undone"] is False and result["payment_id"] is None
    with pytest.raises(PaymentRefused):
        authorize(order_id)
    assert not ProviderAuthorization.objects.exists()
    assert payment(order_id).status == PaymentStatus.PENDING


def test_refund_gives_back_what_was_captured(order_id):
    """Refund: refunded equals captured, once; the void after it finds no open hold."""
    authorize(order_id)
    capture(order_id)
    first = refund(order_id)
    assert first["undone"] is True and first["amount"] == "49.90"
    assert refund(order_id) == first
    assert void(order_id)["undone"] is False
    p = payment(order_id)
    assert p.status == PaymentStatus.REFUNDED
    assert p.refunded_amount == p.captured_amount == Decimal("49.90")
    summary = provider_summary(order_id=order_id)
    assert summary["captured_minor"] == summary["refunded_minor"] == 4990
    assert summary["open_authorization"] is False


def test_refund_with_nothing_captured_refuses_a_late_capture(order_id):
    """A refund that overtakes its capture succeeds; the late capture is refused."""
    authorize(order_id)
    assert refund(order_id)["undone"] is False
    with pytest.raises(PaymentRefused):
        capture(order_id)
    assert payment(order_id).captured_amount == 0


def test_refund_fails_card_keeps_failing_transiently(order_id):
    """``pm_card_refund_fails``: every void and refund raises ProviderUnavailable and no money
    moves, so the saga retries and then escalates."""
    authorize(order_id, pm="pm_card_refund_fails")
    with pytest.raises(ProviderUnavailable):
        void(order_id)
    capture(order_id)
    for _ in range(3):
        with pytest.raises(ProviderUnavailable):
            refund(order_id)
    p = payment(order_id)
    assert p.status == PaymentStatus.CAPTURED and p.refunded_amount == 0


def test_zero_decimal_currency(order_id):
    """JPY has no minor unit: 500 JPY is 500 at the provider and 500 on our side."""
    authorize(order_id, amount="500", currency="jpy")
    assert ProviderAuthorization.objects.get().amount_minor == 500
    assert payment(order_id).authorized_amount == Decimal("500")


def test_an_older_view_recorded_late_never_replaces_a_newer_one(order_id):
    """Recorders of one payment may race (a duplicate delivery, a retry after a lost answer):
    whichever writes last, our row ends on the provider's newest view."""
    from payments.provider import FakePaymentProvider
    from payments.services import _record_view

    auth_id = authorize(order_id)["authorization_id"]
    authorized_view = FakePaymentProvider().retrieve_authorization(auth_id)
    capture(order_id)
    refund = payment_refund(key="saga:s:refund", order_id=order_id, forward_key=CAPTURE)
    assert refund["undone"] is True
    refunded = Payment.objects.get(order_id=order_id)
    assert refunded.status == PaymentStatus.REFUNDED

    late = _record_view(order_id, authorized_view)  # the authorization's answer, recorded last
    assert late is not None and late.id == refunded.id
    after = Payment.objects.get(order_id=order_id)
    assert (after.status, after.captured_amount, after.refunded_amount) == (
        PaymentStatus.REFUNDED,
        Decimal("49.90"),
        Decimal("49.90"),
    )
    # A view as new as the row's, or newer, is written (recording twice changes nothing).
    assert _record_view(order_id, FakePaymentProvider().retrieve_authorization(auth_id)) == late
    assert _record_view(uuid.uuid4(), authorized_view) is None  # no payment of ours


def test_a_capture_repeated_after_its_refund_leaves_the_payment_refunded(order_id):
    """The repeat replays the capture's first answer, the authorization as it was then; our row
    keeps the provider's newer view (refunded)."""
    authorize(order_id)
    first = capture(order_id)
    refund(order_id)
    assert capture(order_id) == first
    p = payment(order_id)
    assert (p.status, p.refunded_amount) == (PaymentStatus.REFUNDED, Decimal("49.90"))


def test_a_capture_answered_without_the_authorization_is_recorded_from_the_provider(order_id):
    """Answers stored before captures carried the authorization still record: we ask for it."""
    from payments.models import ProviderOperation

    authorize(order_id)
    first = capture(order_id)
    op = ProviderOperation.objects.get(key=CAPTURE)
    op.response = {k: v for k, v in op.response.items() if k != "authorization"}
    op.save(update_fields=["response"])
    Payment.objects.filter(order_id=order_id).update(
        status=PaymentStatus.AUTHORIZED, captured_amount=Decimal("0.00"), capture_id=""
    )
    assert capture(order_id) == first
    p = payment(order_id)
    assert (p.status, p.captured_amount, p.capture_id) == (
        PaymentStatus.CAPTURED,
        Decimal("49.90"),
        first["capture_id"],
    )


def test_an_undo_done_by_hand_is_recorded_once_and_only_where_it_applies(order_id):
    """A person voided (or refunded) at the provider what every void (refund) of the saga failed
    to: our row reads the amount voided (refunded), as the provider's own answer would have
    left it. Told again, or told of a void once the money was captured, nothing changes; the
    provider's stale view of the hold does not take it back."""
    from payments.provider import FakePaymentProvider
    from payments.services import (
        _record_view,
        payment_refund_done_by_hand,
        payment_void_done_by_hand,
    )

    auth_id = authorize(order_id, pm="pm_card_refund_fails")["authorization_id"]
    assert payment_refund_done_by_hand(order_id=order_id) == {"recorded": False}  # no capture
    assert payment_void_done_by_hand(order_id=order_id) == {"recorded": True}
    voided = Payment.objects.values().get(order_id=order_id)
    assert (voided["status"], voided["authorized_amount"], voided["voided_amount"]) == (
        PaymentStatus.VOIDED,
        Decimal("49.90"),
        Decimal("49.90"),
    )
    assert payment_void_done_by_hand(order_id=str(order_id)) == {"recorded": False}
    _record_view(order_id, FakePaymentProvider().retrieve_authorization(auth_id))  # authorized
    assert Payment.objects.values().get(order_id=order_id) == voided

    other = uuid.uuid4()
    authorize(other, pm="pm_card_refund_fails", key="saga:o:authorize_payment")
    payment_capture(
        key="saga:o:capture_payment", order_id=other, authorize_key="saga:o:authorize_payment"
    )
    assert payment_void_done_by_hand(order_id=other) == {"recorded": False}  # captured: no hold
    assert payment_refund_done_by_hand(order_id=other) == {"recorded": True}
    assert payment_refund_done_by_hand(order_id=other) == {"recorded": False}
    refunded = payment(other)
    assert (refunded.status, refunded.captured_amount, refunded.refunded_amount) == (
        PaymentStatus.REFUNDED,
        Decimal("49.90"),
        Decimal("49.90"),
    )
    assert refunded.voided_amount == 0
    assert payment_void_done_by_hand(order_id=uuid.uuid4()) == {"recorded": False}  # no payment


NO_WAIT = "set_config('synchronous_commit', 'off', true)"


def _payment_writes(captured) -> list[str]:
    return [q["sql"] for q in captured if '"payments_payment"' in q["sql"]]


@pytest.mark.django_db(transaction=True)
def test_our_payment_writes_do_not_wait_for_the_disk(order_id):
    """As a worker calls them (autocommit): neither the row's insert before the authorize nor
    each recording of the provider's answer waits for its flush. The engine's claim of a step
    that may leave the database (or the record going on into it) waited before the step ran,
    and a crash that lost one of these loses the step's record with it, so the step runs again
    under its key (the provider keeps its answer). Nothing is written before the capture: the
    authorize's row is already there."""
    with CaptureQueriesContext(connection) as authorizing:
        authorize(order_id)
    with CaptureQueriesContext(connection) as capturing:
        capture(order_id)
    insert, recorded = _payment_writes(authorizing)
    assert 'INSERT INTO "payments_payment"' in insert and NO_WAIT in insert
    assert NO_WAIT in recorded
    [captured] = _payment_writes(capturing)
    assert NO_WAIT in captured
    p = payment(order_id)
    assert (p.status, p.captured_amount) == (PaymentStatus.CAPTURED, Decimal("49.90"))


@pytest.mark.django_db(transaction=True)
def test_with_async_lease_commits_off_every_recording_waits(order_id, settings):
    """``SAGA_ASYNC_LEASE_COMMITS`` off: every commit waits for the disk, this one too."""
    settings.SAGA_ASYNC_LEASE_COMMITS = False
    with CaptureQueriesContext(connection) as captured:
        authorize(order_id)
        capture(order_id)
    writes = _payment_writes(captured)
    assert len(writes) == 3 and not any(NO_WAIT in sql for sql in writes)


def test_inside_a_callers_transaction_a_recording_leaves_its_commit_waiting(order_id):
    """Called inside a transaction (as this test is), the recording must not turn off the flush
    wait of the caller's whole transaction."""
    with connection.cursor() as cursor:
        cursor.execute("SET LOCAL synchronous_commit = on")
    authorize(order_id)
    capture(order_id)
    with connection.cursor() as cursor:
        cursor.execute("SHOW synchronous_commit")
        assert cursor.fetchone()[0] == "on"
    assert payment(order_id).status == PaymentStatus.CAPTURED
