"""The fake provider on its own: Stripe's idempotency, the test cards, lookup and tombstones."""

from __future__ import annotations

import pytest
from django.db import DataError, connection
from django.test.utils import CaptureQueriesContext

from payments import provider as provider_module
from payments.errors import (
    DuplicateAuthorization,
    IdempotencyKeyReused,
    PaymentDeclined,
    PaymentRefused,
    PaymentStateConflict,
    ProviderUnavailable,
)
from payments.models import ProviderAuthorization, ProviderOperation
from payments.provider import FakePaymentProvider

pytestmark = pytest.mark.django_db

provider = FakePaymentProvider()


def authorize(key="a", reference="order-1", amount_minor=1234, pm="pm_card_visa", currency="eur"):
    return provider.authorize(
        key=key,
        reference=reference,
        amount_minor=amount_minor,
        currency=currency,
        payment_method=pm,
    )


def test_authorize_records_one_authorization():
    """An approval creates an ``auth_`` authorization for the full amount, in minor units."""
    response = authorize()
    assert response["id"].startswith("auth_")
    assert response["status"] == "authorized"
    assert (response["amount_minor"], response["currency"]) == (1234, "EUR")
    auth = ProviderAuthorization.objects.get()
    assert (auth.reference, auth.amount_minor, auth.payment_method) == (
        "order-1",
        1234,
        "pm_card_visa",
    )


def test_repeated_key_replays_the_first_answer():
    """The same key again returns the first response verbatim and authorizes nothing new."""
    first = authorize()
    assert authorize() == first
    assert ProviderAuthorization.objects.count() == 1
    assert ProviderOperation.objects.count() == 1


def test_decline_is_recorded_and_replayed():
    """A declined card is declined again under the same key, from the record."""
    with pytest.raises(PaymentDeclined) as first:
        authorize(pm="pm_card_declined")
    with pytest.raises(PaymentDeclined) as again:
        authorize(pm="pm_card_visa")  # same key: the first answer stands
    assert first.value.decline_code == again.value.decline_code == "card_declined"
    assert not ProviderAuthorization.objects.exists()
    assert provider.lookup("a")["outcome"] == "declined"


def test_unknown_payment_method_is_declined():
    """A payment method the provider does not know is a decline, not an error."""
    with pytest.raises(PaymentDeclined) as caught:
        authorize(pm="pm_card_bogus")
    assert caught.value.decline_code == "unknown_payment_method"


def test_one_authorization_per_order_whatever_the_key():
    """A second authorization for the same reference is refused (guarantee 2)."""
    authorize(key="a")
    with pytest.raises(DuplicateAuthorization):
        authorize(key="b")
    assert ProviderAuthorization.objects.count() == 1
    assert provider.lookup("b") is None


def test_capture_takes_the_whole_amount_once():
    """Capture moves the authorized amount; repeating the key does not capture again."""
    auth = authorize()
    first = provider.capture(key="c", authorization_id=auth["id"])
    assert first["id"].startswith("cap_") and first["amount_minor"] == 1234
    assert provider.capture(key="c", authorization_id=auth["id"]) == first
    assert provider.retrieve_authorization(auth["id"])["captured_minor"] == 1234


def test_a_capture_answers_with_the_authorization_as_it_left_it():
    """As a real provider returns the object a request changed: no second request needed."""
    auth = authorize()
    answer = provider.capture(key="c", authorization_id=auth["id"])
    assert answer["authorization"] == provider.retrieve_authorization(auth["id"])
    assert answer["authorization"]["status"] == "captured"
    assert answer["authorization"]["capture_id"] == answer["id"]


def test_an_authorize_answers_with_the_authorization_as_stored():
    """The answer is built before the rows are written: it must match what was written."""
    answer = authorize()
    assert answer == provider.retrieve_authorization(answer["id"])
    assert provider.lookup("a")["authorization_id"] == answer["id"]


def test_second_capture_under_another_key_is_declined():
    """An authorization is captured at most once, whatever key the second capture uses."""
    auth = authorize()
    provider.capture(key="c", authorization_id=auth["id"])
    with pytest.raises(PaymentDeclined) as caught:
        provider.capture(key="c2", authorization_id=auth["id"])
    assert caught.value.decline_code == "authorization_captured"


def test_capture_declined_card():
    """``pm_card_capture_declined`` authorizes, then its capture is declined (and recorded)."""
    auth = authorize(pm="pm_card_capture_declined")
    with pytest.raises(PaymentDeclined) as caught:
        provider.capture(key="c", authorization_id=auth["id"])
    assert caught.value.decline_code == "capture_declined"
    assert provider.retrieve_authorization(auth["id"])["status"] == "authorized"
    assert provider.lookup("c")["outcome"] == "declined"


def test_refund_fails_card_fails_every_void_and_refund_without_a_trace():
    """``pm_card_refund_fails``: void and refund raise a transient error and record nothing."""
    auth = authorize(key="a1", reference="o1", pm="pm_card_refund_fails")
    with pytest.raises(ProviderUnavailable):
        provider.void(key="a1:undo", authorize_key="a1")
    authorize(key="a2", reference="o2", pm="pm_card_refund_fails")
    capture = provider.capture(key="c2", authorization_id=provider.lookup("a2")["authorization_id"])
    for _ in range(3):
        with pytest.raises(ProviderUnavailable):
            provider.refund(key="c2:undo", capture_key="c2")
    assert provider.lookup("a1:undo") is None and provider.lookup("c2:undo") is None
    assert provider.retrieve_authorization(auth["id"])["status"] == "authorized"
    assert capture["amount_minor"] == 1234
    assert not hasattr(ProviderUnavailable("x"), "code")


def test_void_releases_the_hold_once():
    """Void moves the authorization to voided; a repeat replays the first answer."""
    auth = authorize()
    first = provider.void(key="a:undo", authorize_key="a")
    assert first["undone"] is True and first["amount_minor"] == 1234
    assert provider.void(key="a:undo", authorize_key="a") == first
    assert provider.retrieve_authorization(auth["id"])["status"] == "voided"


def test_void_of_a_captured_authorization_is_a_conflict():
    """A captured authorization has no hold to void: it must be refunded instead."""
    auth = authorize()
    provider.capture(key="c", authorization_id=auth["id"])
    with pytest.raises(PaymentStateConflict):
        provider.void(key="a:undo", authorize_key="a")


def test_void_with_nothing_authorized_leaves_a_tombstone_refusing_a_late_authorize():
    """A void that overtakes its authorize succeeds; the late authorize is refused."""
    response = provider.void(key="a:undo", authorize_key="a")
    assert response["undone"] is False and response["reason"] == "forward_tombstone"
    assert provider.lookup("a")["outcome"] == "tombstone"
    with pytest.raises(PaymentRefused) as caught:
        authorize()
    assert caught.value.code == "already_compensated"
    assert not ProviderAuthorization.objects.exists()


def test_void_of_a_declined_authorize_is_nothing_to_do():
    """A declined authorize held nothing; its void succeeds without a tombstone."""
    with pytest.raises(PaymentDeclined):
        authorize(pm="pm_card_declined")
    response = provider.void(key="a:undo", authorize_key="a")
    assert response["undone"] is False and response["reason"] == "forward_declined"


def test_refund_with_nothing_captured_leaves_a_tombstone_refusing_a_late_capture():
    """A refund that overtakes its capture succeeds; the late capture is refused."""
    auth = authorize()
    response = provider.refund(key="c:undo", capture_key="c")
    assert response["undone"] is False
    with pytest.raises(PaymentRefused):
        provider.capture(key="c", authorization_id=auth["id"])
    assert provider.retrieve_authorization(auth["id"])["captured_minor"] == 0


def test_refund_gives_back_the_capture_once():
    """Refund returns exactly what was captured, and a repeat does not refund twice."""
    auth = authorize()
    provider.capture(key="c", authorization_id=auth["id"])
    first = provider.refund(key="c:undo", capture_key="c")
    assert first["undone"] is True and first["refund_id"].startswith("re_")
    assert provider.refund(key="c:undo", capture_key="c") == first
    after = provider.retrieve_authorization(auth["id"])
    assert (after["status"], after["captured_minor"], after["refunded_minor"]) == (
        "refunded",
        1234,
        1234,
    )
    # The saga then voids the authorization: nothing is open any more, and that is fine.
    assert provider.void(key="a:undo", authorize_key="a")["undone"] is False


def test_lookup_settles_an_unknown_outcome():
    """``lookup`` says whether a request under a key took effect, and what it answered."""
    assert provider.lookup("a") is None
    response = authorize()
    found = provider.lookup("a")
    assert found["took_effect"] is True and found["kind"] == "authorize"
    assert found["response"] == response


def test_a_key_belongs_to_one_kind_of_request():
    """Reusing an authorize key for a capture is refused instead of guessed at."""
    auth = authorize()
    with pytest.raises(IdempotencyKeyReused):
        provider.capture(key="a", authorization_id=auth["id"])


@pytest.mark.parametrize("amount_minor", [-1, 12.5, True])
def test_amounts_are_non_negative_integers(amount_minor):
    """Minor units are ints: negatives, floats and bools are refused."""
    with pytest.raises(ValueError):
        authorize(amount_minor=amount_minor)


@pytest.mark.django_db(transaction=True)
def test_an_authorize_is_one_statement_and_a_first_capture_two():
    """As a worker calls it (autocommit): the authorize's operation and authorization go in
    one statement without a read of the key first; a first capture reads the authorization,
    then writes the operation and the capture in one statement. A repeat writes nothing."""
    with CaptureQueriesContext(connection) as authorizing:
        auth = authorize()
    with CaptureQueriesContext(connection) as capturing:
        capture = provider.capture(key="c", authorization_id=auth["id"])
    assert len(authorizing) == 1, [q["sql"] for q in authorizing]
    assert len(capturing) == 2, [q["sql"] for q in capturing]
    # Autocommitted, the ledger's writes do not wait for the disk (it stands in for a remote
    # provider); the read does not write.
    no_wait = "set_config('synchronous_commit', 'off', true)"
    assert no_wait in authorizing[0]["sql"] and no_wait in capturing[1]["sql"]
    assert authorize() == auth
    assert provider.capture(key="c", authorization_id=auth["id"]) == capture
    assert ProviderOperation.objects.count() == 2
    assert ProviderAuthorization.objects.get().captured_minor == 1234


@pytest.mark.django_db(transaction=True)
def test_a_capture_that_read_the_authorization_before_a_void_captures_nothing(monkeypatch):
    """The capture reads the authorization without a lock; a void that commits between that
    read and the capture's write must win: the write checks the authorization is still
    ``authorized`` under its lock, and the capture is then declined as the careful path
    decides, with the hold left voided."""
    auth = authorize()
    before_void = ProviderAuthorization.objects.get()
    provider.void(key="a:undo", authorize_key="a")
    monkeypatch.setattr(provider_module, "_authorization", lambda _id: before_void)
    with pytest.raises(PaymentDeclined) as caught:
        provider.capture(key="c", authorization_id=auth["id"])
    assert caught.value.decline_code == "authorization_voided"
    after = ProviderAuthorization.objects.get()
    assert (after.status, after.captured_minor) == ("voided", 0)
    assert provider.lookup("c")["outcome"] == "declined"


def test_a_key_longer_than_its_column_is_refused_not_cut():
    """The composed statements cast their values to the column's type without its length, so
    a value too long for its column is refused as ``save()`` refuses it, not stored cut short
    (a cut key would answer "never seen" for money taken)."""
    auth = authorize()
    long_key = "k" * 300
    with pytest.raises(DataError):
        provider.capture(key=long_key, authorization_id=auth["id"])
    with pytest.raises(DataError):
        authorize(key=long_key, reference="order-2")
    assert not ProviderOperation.objects.filter(key__startswith="kkk").exists()
    assert ProviderAuthorization.objects.get(id=auth["id"]).status == "authorized"


def test_a_repeat_the_columns_would_refuse_still_replays_its_first_answer():
    """The key is not read before the write any more: a repeat whose values the columns refuse
    (a currency too long) meets that refusal first, and still gets the first answer."""
    first = authorize()
    assert authorize(currency="EURO") == first


def test_inside_a_callers_transaction_the_ledger_leaves_its_commit_waiting_for_the_disk():
    """Called inside a transaction (as this test is), the one-statement writes must not turn
    off the flush wait of the caller's whole transaction."""
    with connection.cursor() as cursor:
        cursor.execute("SET LOCAL synchronous_commit = on")
    auth = authorize()
    provider.capture(key="c", authorization_id=auth["id"])
    with connection.cursor() as cursor:
        cursor.execute("SHOW synchronous_commit")
        assert cursor.fetchone()[0] == "on"


def test_an_answer_lost_with_its_ledger_is_given_again_with_the_same_ids():
    """The ledger's writes do not wait for the disk: a server crash can lose an authorization
    and a capture together with our copies of them, and the step's retry asks again under the
    same keys. It gets the same authorization and capture ids, as a real provider replays
    them, not new ones that someone who read the first would see change. Other keys get
    others."""
    auth = authorize()
    capture = provider.capture(key="c", authorization_id=auth["id"])
    ProviderOperation.objects.all().delete()  # what the crash lost
    ProviderAuthorization.objects.all().delete()
    again = authorize()
    assert again["id"] == auth["id"]
    assert provider.capture(key="c", authorization_id=again["id"])["id"] == capture["id"]
    other = authorize(key="b", reference="order-2")
    assert other["id"] != auth["id"] and other["id"].startswith("auth_")
