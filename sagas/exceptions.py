"""Errors the engine raises to its callers (services, admin, API)."""


class SagaOperationRefused(Exception):
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


class SignalPayloadInvalid(Exception):
    """A signal's payload the saga type refuses (e.g. ``approved`` is not a boolean)."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.code = "invalid_payload"
        self.detail = detail
