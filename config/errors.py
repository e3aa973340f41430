"""The application's errors: what an app raises on purpose, and what a client is told.

Every app's deliberate errors derive from :class:`AppError` (an order that is not valid, a
saga operation that makes no sense now, an idempotency key misused, a participant's business
"no"). Each carries a machine-readable ``code``, a ``detail`` for people and optionally
``fields`` (input path -> messages); its class says which HTTP status it is. One handler
(:func:`config.api_errors.exception_handler`) turns any of them into ``{code, detail, fields}``
without knowing the apps. No imports: every app may depend on this module.
"""

from __future__ import annotations


class AppError(Exception):
    """Base of every error an app raises on purpose."""

    #: The HTTP status a client gets for it.
    http_status = 400
    code = "invalid"
    detail = ""
    fields: dict[str, list[str]] | None = None
    #: Extra response headers (e.g. ``Retry-After``).
    headers: dict[str, str] = {}

    def status_for_client(self) -> int:
        return self.http_status
