"""A fake payment provider with Stripe's semantics, behind the one client class we call.

What it copies from Stripe, because the saga depends on it:

- Every request carries an idempotency key. The first answer under a key, approval *or*
  decline, is stored and replayed verbatim for any repeat, so a retry after a lost response
  cannot authorize or capture twice.
- ``lookup(key)`` tells whether a request under a key took effect and what it answered; that
  is how a caller settles an outcome it never heard.
- Transient failures (:class:`ProviderUnavailable`) happen before anything is written and are
  not stored, so retrying them is always safe.

What it adds, because a saga's undo can overtake its do: ``void`` and ``refund`` name the
*forward* request they undo. If that request never took effect, they succeed and leave a
tombstone under its key, and a late authorize or capture with that key is refused.

It keeps its own ledger (:class:`ProviderOperation`, :class:`ProviderAuthorization`) and
amounts are integer minor units here, as at a real provider's API. Each call is its own short
transaction, as a remote call would be, when it is called outside a transaction, as the saga's
steps call it (inside a caller's transaction its writes go in a savepoint of it). On
PostgreSQL an authorize writes in one statement and a first capture in one after a read: the
simulated provider costs the benchmarks three round trips per order, not eleven.

Test cards (``payment_method``): ``pm_card_visa`` approves; ``pm_card_declined`` declines the
authorization; ``pm_card_capture_declined`` authorizes but declines the capture;
``pm_card_refund_fails`` approves, but every void and refund of it fails, transiently (retried)
with :class:`ProviderRefusedUndo`, an answer: the provider stays healthy for its breaker.
Anything else is declined as ``unknown_payment_method``.
"""

from __future__ import annotations

import functools
import hashlib
import uuid
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

from django.db import DataError, IntegrityError, connections, router, transaction

from config.db import (
    NO_FLUSH_WAIT,
    RowBy,
    assignment_parts,
    insert_parts,
    insert_row,
    may_skip_save,
    update_row,
)
from payments.errors import (
    DuplicateAuthorization,
    IdempotencyKeyReused,
    PaymentDeclined,
    PaymentRefused,
    PaymentStateConflict,
    ProviderRefusedUndo,
)
from payments.models import (
    AuthorizationStatus,
    OperationKind,
    OperationOutcome,
    ProviderAuthorization,
    ProviderOperation,
)

# The provider's reads by key run on every call: their SQL is built once (config.db.RowBy).
_operation = RowBy(ProviderOperation.objects.all(), "key")
_authorization = RowBy(ProviderAuthorization.objects.all(), "id")
_authorization_for_update = RowBy(ProviderAuthorization.objects.select_for_update(), "id")
_CAPTURED_FIELDS = ("status", "captured_minor", "capture_id", "updated_at")


def _one_statement(using: str) -> bool:
    """Whether the ledger's writes of a call may go as one composed statement (PostgreSQL, and
    nothing listening for saves of its rows, which the statement would not send)."""
    return may_skip_save(ProviderOperation, using) and may_skip_save(ProviderAuthorization, using)


def _with(ctes: list[str], result: str, wait: bool) -> str:
    if wait:
        return f"WITH {', '.join(ctes)} {result}"
    return f"WITH {', '.join([NO_FLUSH_WAIT, *ctes])} {result}, nf"


@functools.cache
def _authorize_sql(using: str, approved: bool, wait: bool) -> str:
    """The operation and, if approved and only if the operation went in, its authorization:
    one statement (``wait``: its commit waits for the disk, see :func:`_run_alone`)."""
    op, auth = insert_parts(ProviderOperation, using), insert_parts(ProviderAuthorization, using)
    ctes = [
        f"o AS (INSERT INTO {op.table} ({op.columns}) VALUES ({op.placeholders}) "
        f'ON CONFLICT ("key") DO NOTHING RETURNING 1)'
    ]
    if not approved:
        return _with(ctes, "SELECT count(*) FROM o", wait)
    ctes.append(
        f"a AS (INSERT INTO {auth.table} ({auth.columns}) SELECT {auth.placeholders} "
        f"FROM o RETURNING 1)"
    )
    return _with(ctes, "SELECT count(*) FROM a", wait)


@functools.cache
def _capture_sql(using: str, wait: bool) -> str:
    """Lock the authorization if it is still capturable, insert the operation under its key
    unless the key is taken, and only then mark the authorization captured: one statement
    (``wait``: its commit waits for the disk, see :func:`_run_alone`)."""
    op = insert_parts(ProviderOperation, using)
    sets = assignment_parts(ProviderAuthorization, _CAPTURED_FIELDS, using)
    ctes = [
        f'a AS MATERIALIZED (SELECT "id" FROM {sets.table} WHERE "id" = %s AND '
        f'"status" = %s FOR UPDATE)',
        f"o AS (INSERT INTO {op.table} ({op.columns}) SELECT {op.placeholders} FROM a "
        f'ON CONFLICT ("key") DO NOTHING RETURNING 1)',
        f'u AS (UPDATE {sets.table} SET {sets.placeholders} WHERE "id" IN (SELECT "id" FROM a) '
        f"AND EXISTS (SELECT FROM o) RETURNING 1)",
    ]
    return _with(ctes, "SELECT count(*) FROM u", wait)


def _run_alone(using: str, build: Callable[[bool], str], params: list[Any]) -> int:
    """Run one composed statement, built by ``build(wait)``.

    Autocommitted (its own transaction, as a worker calls the provider), its commit does not
    wait for the WAL flush: this ledger stands in for a remote provider, whose durability is
    on its side and costs a real deployment's database nothing, and the WAL is one sequence,
    so our own next write that does wait (the saga's record before the next step that may
    leave the database, or the one that hands it on or ends it) flushes the ledger's first;
    a server crash before that loses the answer and our record of it together, and the step's
    retry asks again under the same key and gets the same ids (:func:`_new_id`).
    Inside a caller's transaction it runs in a savepoint of it (so that a conflict leaves that
    transaction usable) and leaves the transaction's commit as it is.
    """
    db = connections[using]
    nested = db.in_atomic_block
    alone = transaction.atomic(using=using) if nested else nullcontext()
    with alone, db.cursor() as cursor:
        cursor.execute(build(nested), params)
        return cursor.fetchone()[0]


def _insert_authorize(op: ProviderOperation, auth: ProviderAuthorization | None) -> bool:
    """Write an authorize's answer (``auth``: its authorization, ``None`` for a decline):
    ``False`` if its key was taken (nothing written).

    The operation goes in under its key unless the key is taken (by a repeat, or a void's
    tombstone), and the authorization beside it only if the operation did: one round trip on
    PostgreSQL, where reading the key first, then two inserts in a transaction, took five.
    Raises ``IntegrityError`` if the order already has an authorization under another key.
    """
    using = router.db_for_write(ProviderOperation)
    if _one_statement(using):
        op_values = insert_parts(ProviderOperation, using).values(op, add=True)
        auth_parts = insert_parts(ProviderAuthorization, using)
        auth_values = [] if auth is None else auth_parts.values(auth, add=True)
        if op_values is not None and auth_values is not None:
            approved = auth is not None
            build = functools.partial(_authorize_sql, using, approved)
            return _run_alone(using, build, op_values + auth_values) == 1
    if ProviderOperation.objects.filter(key=op.key).exists():
        return False
    with transaction.atomic(using=using):
        insert_row(op)
        if auth is not None:
            # The operation's foreign key is checked at commit (deferred), so the
            # authorization may follow it in the same transaction.
            insert_row(auth)
    return True


def _locked_authorization(authorization_id: str | None) -> ProviderAuthorization:
    auth = _authorization_for_update(authorization_id)
    if auth is None:
        raise ProviderAuthorization.DoesNotExist(f"no authorization {authorization_id!r}")
    return auth


PM_VISA = "pm_card_visa"
PM_DECLINED = "pm_card_declined"
PM_CAPTURE_DECLINED = "pm_card_capture_declined"
PM_REFUND_FAILS = "pm_card_refund_fails"
#: Approves like ``pm_card_visa``; the order saga first waits for the card holder's 3-D Secure
#: confirmation (the provider is only asked once it came).
PM_3DS_REQUIRED = "pm_card_3ds_required"
#: The test cards, in the order a client is told about them; the one list (orders validates
#: ``payment_method`` against it too).
TEST_CARDS = (PM_VISA, PM_DECLINED, PM_CAPTURE_DECLINED, PM_REFUND_FAILS, PM_3DS_REQUIRED)
KNOWN_PAYMENT_METHODS = frozenset(TEST_CARDS)


def _new_id(prefix: str, key: str | None = None) -> str:
    """An id for a new authorization, capture or refund. Authorizations and captures, whose
    ledger writes do not wait for the disk (:func:`_run_alone`), get theirs from the request's
    key: a server crash can lose an answer and our copy of it together, and the step's retry
    under the same key must get the same ids back, as a real provider would replay them, not
    new ones that staff who read the first might see change. A refund, committed in a
    transaction that waits, gets a random one."""
    if key is None:
        return f"{prefix}_{uuid.uuid4().hex[:24]}"
    return f"{prefix}_{hashlib.sha256(key.encode()).hexdigest()[:24]}"


class FakePaymentProvider:
    """The provider client. Stateless: the ledger tables are the provider's state."""

    # -- forward requests ---------------------------------------------------------------------
    def authorize(
        self,
        *,
        key: str,
        reference: str,
        amount_minor: int,
        currency: str,
        payment_method: str,
    ) -> dict[str, Any]:
        """Hold ``amount_minor`` on the card; raises :class:`PaymentDeclined` on a decline."""
        if isinstance(amount_minor, bool) or not isinstance(amount_minor, int) or amount_minor < 0:
            raise ValueError(f"amount_minor must be a non-negative int, got {amount_minor!r}")
        currency = currency.upper()
        # The answer is known before anything is written (the authorization's id is ours to
        # choose), so the operation is written once, whole, with the authorization beside it,
        # without reading the key first: a repeat finds it taken and replays what is there.
        # A concurrent repeat of this key waits on its unique index, then replays.
        op = ProviderOperation(
            key=key,
            kind=OperationKind.AUTHORIZE,
            outcome=OperationOutcome.SUCCEEDED,
            amount_minor=amount_minor,
            currency=currency,
            reference=reference,
        )
        auth = None
        decline_code = self._authorize_decline(payment_method)
        if decline_code:
            self._decline(op, decline_code)
        else:
            auth = ProviderAuthorization(
                id=_new_id("auth", key),
                reference=reference,
                currency=currency,
                amount_minor=amount_minor,
                payment_method=payment_method,
            )
            op.authorization = auth
            op.response = self._authorization_response(auth)
        try:
            if _insert_authorize(op, auth):
                return self._replay(op)
            conflict = None
        except (IntegrityError, DataError) as exc:
            # DataError: values the columns refuse. The key is not read first any more, so a
            # repeat with such values still replays what its key answered first.
            conflict = exc
        # Another request with this key (or a void's tombstone) was there first; or this order
        # already has an authorization under another key.
        recorded = self._recorded(key, OperationKind.AUTHORIZE)
        if recorded is not None:
            return self._replay(recorded)
        if ProviderAuthorization.objects.filter(reference=reference).exists():
            raise DuplicateAuthorization(
                f"reference {reference!r} already has an authorization"
            ) from None
        raise conflict or IntegrityError(f"authorize under {key!r}: the key vanished")

    def capture(self, *, key: str, authorization_id: str) -> dict[str, Any]:
        """Take the whole authorized amount; raises :class:`PaymentDeclined` on a decline."""
        answer = self._capture_at_once(key, authorization_id)
        if answer is not None:
            return answer
        recorded = self._recorded(key, OperationKind.CAPTURE)
        if recorded is not None:
            return self._replay(recorded)
        try:
            with transaction.atomic():
                # The authorization is locked first and the answer decided, so the operation
                # is inserted once, whole. A concurrent repeat of this key waits on the lock,
                # finds the authorization captured, and replays when its insert meets ours.
                auth = _locked_authorization(authorization_id)
                op, decline_code = self._capture_answer(key, auth)
                insert_row(op)
                if not decline_code:
                    update_row(auth, _CAPTURED_FIELDS)
        except IntegrityError as exc:
            return self._replay_after_conflict(key, OperationKind.CAPTURE, exc)
        return self._replay(op)

    def _capture_at_once(self, key: str, authorization_id: str) -> dict[str, Any] | None:
        """The usual capture, a first one of a capturable authorization, in two round trips
        instead of six (outside a transaction; inside one, a savepoint's two more): the
        authorization read without a lock, then one statement that locks it only if it is
        still ``authorized``, inserts the operation unless the key is taken, and captures only
        if the operation went in. What the answer says of the authorization (its amount,
        reference, currency, card) never changes while it is ``authorized``, so the unlocked
        read is as good as a locked one once the statement found it so. ``None`` if anything
        else happened (a repeat, a decline, a concurrent capture or void, a database other
        than PostgreSQL): the careful path decides then, and nothing was written.
        """
        using = router.db_for_write(ProviderOperation)
        if not _one_statement(using) or not authorization_id:
            return None
        auth = _authorization(authorization_id)
        if auth is None or self._capture_decline(auth):
            return None
        op, _ = self._capture_answer(key, auth)
        op_values = insert_parts(ProviderOperation, using).values(op, add=True)
        sets = assignment_parts(ProviderAuthorization, _CAPTURED_FIELDS, using)
        set_values = sets.values(auth, add=False)
        if op_values is None or set_values is None:
            return None
        params = [auth.id, AuthorizationStatus.AUTHORIZED.value, *op_values, *set_values]
        try:
            captured = _run_alone(using, functools.partial(_capture_sql, using), params)
        except IntegrityError:
            return None
        return self._replay(op) if captured == 1 else None

    def _capture_answer(
        self, key: str, auth: ProviderAuthorization
    ) -> tuple[ProviderOperation, str]:
        """The capture's operation, whole, and its decline code (``""`` if approved); an
        approval changes ``auth`` as the capture will leave it."""
        op = ProviderOperation(
            key=key,
            kind=OperationKind.CAPTURE,
            outcome=OperationOutcome.SUCCEEDED,
            authorization=auth,
            reference=auth.reference,
            currency=auth.currency,
        )
        decline_code = self._capture_decline(auth)
        if decline_code:
            self._decline(op, decline_code)
            return op, decline_code
        auth.status = AuthorizationStatus.CAPTURED
        auth.captured_minor = auth.amount_minor
        auth.capture_id = _new_id("cap", key)
        op.amount_minor = auth.captured_minor
        op.response = {
            "object": "capture",
            "id": auth.capture_id,
            "authorization_id": auth.id,
            "reference": auth.reference,
            "amount_minor": auth.captured_minor,
            "currency": auth.currency,
            "status": "succeeded",
            # The authorization as this capture left it, as a real provider returns the
            # object a request changed: the caller records it without asking again.
            "authorization": self._authorization_response(auth),
        }
        return op, ""

    # -- undo requests ------------------------------------------------------------------------
    def void(self, *, key: str, authorize_key: str) -> dict[str, Any]:
        """Release the hold made by the authorize under ``authorize_key``, if there is one."""
        return self._undo(
            key=key,
            kind=OperationKind.VOID,
            forward_key=authorize_key,
            forward_kind=OperationKind.AUTHORIZE,
        )

    def refund(self, *, key: str, capture_key: str) -> dict[str, Any]:
        """Give back the money taken by the capture under ``capture_key``, if there is any."""
        return self._undo(
            key=key,
            kind=OperationKind.REFUND,
            forward_key=capture_key,
            forward_kind=OperationKind.CAPTURE,
        )

    # -- reads --------------------------------------------------------------------------------
    def lookup(self, key: str) -> dict[str, Any] | None:
        """What the request under ``key`` did, or ``None`` if the provider never saw it."""
        op = _operation(key)
        if op is None:
            return None
        return {
            "key": op.key,
            "kind": op.kind,
            "outcome": op.outcome,
            "took_effect": op.outcome == OperationOutcome.SUCCEEDED,
            "amount_minor": op.amount_minor,
            "currency": op.currency,
            "reference": op.reference,
            "authorization_id": op.authorization_id,
            "response": op.response,
        }

    def retrieve_authorization(self, authorization_id: str) -> dict[str, Any]:
        """The authorization as it is now (not as it was first answered)."""
        return self._authorization_response(ProviderAuthorization.objects.get(id=authorization_id))

    # -- internals ----------------------------------------------------------------------------
    def _undo(self, *, key: str, kind: str, forward_key: str, forward_kind: str) -> dict[str, Any]:
        recorded = self._recorded(key, kind)
        if recorded is not None:
            return self._replay(recorded)
        try:
            with transaction.atomic():
                # Our own key first: a concurrent repeat of this undo waits here, then replays.
                op = ProviderOperation.objects.create(
                    key=key, kind=kind, outcome=OperationOutcome.SUCCEEDED
                )
                forward = self._forward_or_tombstone(forward_key, forward_kind, undo_key=key)
                response: dict[str, Any] = {
                    "object": kind,
                    "forward_key": forward_key,
                    "status": "succeeded",
                }
                if forward.outcome != OperationOutcome.SUCCEEDED:
                    # Nothing took effect under the forward key: a decline, or our tombstone.
                    response |= {"undone": False, "reason": f"forward_{forward.outcome}"}
                else:
                    auth = _locked_authorization(forward.authorization_id)
                    if auth.payment_method == PM_REFUND_FAILS:
                        # Rolls back the whole transaction: nothing of this attempt is kept.
                        raise ProviderRefusedUndo(f"{kind} of {auth.id} failed (test card)")
                    response |= self._apply_undo(kind, auth)
                    op.authorization = auth
                    op.reference = auth.reference
                    op.currency = auth.currency
                    op.amount_minor = response["amount_minor"]
                op.response = response
                op.save()
        except IntegrityError as exc:
            return self._replay_after_conflict(key, kind, exc)
        return self._replay(op)

    def _forward_or_tombstone(
        self, forward_key: str, forward_kind: str, *, undo_key: str
    ) -> ProviderOperation:
        """The forward request's record, or a tombstone written in its place.

        If the forward request is in flight, the tombstone's insert waits for it on the unique
        key and then fails, and we undo what it did instead.
        """
        forward = _operation(forward_key)
        if forward is None:
            try:
                with transaction.atomic():
                    return ProviderOperation.objects.create(
                        key=forward_key,
                        kind=forward_kind,
                        outcome=OperationOutcome.TOMBSTONE,
                        response={"object": forward_kind, "tombstoned_by": undo_key},
                    )
            except IntegrityError:
                forward = ProviderOperation.objects.get(key=forward_key)
        if forward.kind != forward_kind:
            raise IdempotencyKeyReused(
                f"key {forward_key!r} belongs to a {forward.kind}, not a {forward_kind}"
            )
        return forward

    def _apply_undo(self, kind: str, auth: ProviderAuthorization) -> dict[str, Any]:
        base = {"authorization_id": auth.id, "reference": auth.reference, "currency": auth.currency}
        if kind == OperationKind.VOID:
            if auth.status == AuthorizationStatus.AUTHORIZED:
                auth.status = AuthorizationStatus.VOIDED
                update_row(auth, ["status", "updated_at"])
                return base | {"undone": True, "amount_minor": auth.amount_minor}
            if auth.status == AuthorizationStatus.VOIDED:
                return base | {"undone": True, "amount_minor": auth.amount_minor}
            if auth.status == AuthorizationStatus.REFUNDED:
                # Captured and refunded already: no hold is left open.
                return base | {"undone": False, "reason": "refunded", "amount_minor": 0}
            raise PaymentStateConflict(
                f"{auth.id} is captured; it must be refunded before it can be voided"
            )
        # refund: only a capture has anything to give back
        if auth.status == AuthorizationStatus.CAPTURED:
            auth.status = AuthorizationStatus.REFUNDED
            auth.refunded_minor = auth.captured_minor
            auth.refund_id = _new_id("re")
            update_row(auth, ["status", "refunded_minor", "refund_id", "updated_at"])
        if auth.status != AuthorizationStatus.REFUNDED:
            raise PaymentStateConflict(f"{auth.id} is {auth.status}; there is nothing to refund")
        return base | {
            "undone": True,
            "refund_id": auth.refund_id,
            "amount_minor": auth.refunded_minor,
        }

    @staticmethod
    def _authorize_decline(payment_method: str) -> str:
        if payment_method == PM_DECLINED:
            return "card_declined"
        if payment_method not in KNOWN_PAYMENT_METHODS:
            return "unknown_payment_method"
        return ""

    @staticmethod
    def _capture_decline(auth: ProviderAuthorization) -> str:
        if auth.status != AuthorizationStatus.AUTHORIZED:
            return f"authorization_{auth.status}"
        if auth.payment_method == PM_CAPTURE_DECLINED:
            return "capture_declined"
        return ""

    @staticmethod
    def _decline(op: ProviderOperation, decline_code: str) -> None:
        """Make ``op`` (not yet saved) the record of a decline."""
        op.outcome = OperationOutcome.DECLINED
        op.response = {"object": op.kind, "status": "declined", "decline_code": decline_code}

    @staticmethod
    def _authorization_response(auth: ProviderAuthorization) -> dict[str, Any]:
        return {
            "object": "authorization",
            "id": auth.id,
            "reference": auth.reference,
            "amount_minor": auth.amount_minor,
            "captured_minor": auth.captured_minor,
            "refunded_minor": auth.refunded_minor,
            "currency": auth.currency,
            "status": str(auth.status),
            "capture_id": auth.capture_id,
            "refund_id": auth.refund_id,
        }

    @staticmethod
    def _recorded(key: str, kind: str) -> ProviderOperation | None:
        op = _operation(key)
        if op is not None and op.kind != kind:
            raise IdempotencyKeyReused(f"key {key!r} was first used for a {op.kind}, not a {kind}")
        return op

    def _replay_after_conflict(self, key: str, kind: str, exc: IntegrityError) -> dict[str, Any]:
        """Another request with this key committed first: answer what it answered."""
        op = self._recorded(key, kind)
        if op is None:  # the conflict was not about the key: do not hide it
            raise exc
        return self._replay(op)

    @staticmethod
    def _replay(op: ProviderOperation) -> dict[str, Any]:
        """The first answer under this key, exactly as it was given."""
        if op.outcome == OperationOutcome.TOMBSTONE:
            raise PaymentRefused(
                f"{op.kind} under {op.key!r} was already undone; it cannot take effect now"
            )
        if op.outcome == OperationOutcome.DECLINED:
            raise PaymentDeclined(op.response.get("decline_code", "declined"))
        return dict(op.response)
