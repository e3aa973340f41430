"""Errors the engine raises to its callers (services, admin, API)."""

from config.errors import AppError
from config.idempotency import IdempotencyKeyInvalid


class SagaOperationRefused(AppError):
    """An operation that makes no sense in the saga's current state.

    ``code`` is machine-readable (the API returns it as the error code); ``detail`` says why in
    words a support person understands; ``fields`` optionally names what the refusal is about
    (the API returns it as the error body's ``fields``).
    """

    def __init__(self, code: str, detail: str, fields: dict[str, list[str]] | None = None) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.fields = fields

    http_status = 409

    def status_for_client(self) -> int:
        return 404 if self.code == "not_found" else 409


class SignalPayloadInvalid(AppError):
    """A signal's payload the saga type refuses (e.g. ``approved`` is not a boolean)."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.code = "invalid_payload"
        self.detail = detail


class SignalKeyInvalid(IdempotencyKeyInvalid):
    """A signal's ``Idempotency-Key`` that cannot be kept (empty, too long, control
    characters): the same ``400 invalid_idempotency_key`` as an order's, naming the header, not
    the payload."""


class SignalKeyReused(AppError):
    """The signal's ``Idempotency-Key`` was first used with another payload (a ``422``): the
    first signal stands, and a changed decision needs a key of its own."""

    code = "idempotency_key_reused"
    http_status = 422

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail
