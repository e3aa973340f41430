"""Payment answers. Subclasses of :class:`PaymentError` are definite (they carry a ``code``);
:class:`ProviderUnavailable` is transient on purpose and carries none, so it is retried."""

from __future__ import annotations

from config.errors import AppError
from sagas.public import NothingHappened, ProviderAnswered


class PaymentError(AppError):
    """A definite answer from the provider; asking again with the same key gets it again."""

    code = "payment_error"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class PaymentDeclined(PaymentError):
    """The provider said no to an authorization or a capture; ``decline_code`` says why."""

    code = "payment_declined"

    def __init__(self, decline_code: str, detail: str = "") -> None:
        super().__init__(detail or f"declined: {decline_code}")
        self.decline_code = decline_code


class PaymentRefused(PaymentError):
    """An authorize or capture arrived under a key that a void or refund already closed.

    The undo got there first and left a tombstone; taking effect now would move money that no
    compensation is left to give back.
    """

    code = "already_compensated"


class PaymentStateConflict(PaymentError):
    """The request contradicts what already happened (e.g. voiding a captured authorization)."""

    code = "payment_state_conflict"


class IdempotencyKeyReused(PaymentError):
    """The key was first used for a different kind of operation; the provider will not guess."""

    code = "idempotency_key_reused"


class DuplicateAuthorization(PaymentError):
    """The order already has an authorization under another key (guarantee 2: at most one)."""

    code = "duplicate_authorization"


class ProviderUnavailable(ConnectionError, NothingHappened):
    """The provider could not be reached or failed before doing anything: retry later (and
    nothing to undo for it)."""


class ProviderRefusedUndo(ProviderUnavailable, ProviderAnswered):
    """The provider answered, and would not do this void or refund this time (every undo of
    ``pm_card_refund_fails``): retried like :class:`ProviderUnavailable`, but the provider is
    up, so its breaker counts a healthy call."""
