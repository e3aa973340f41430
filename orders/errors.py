"""Why an order was refused, in a shape the API can hand to the client as it is."""

from __future__ import annotations

from config.errors import AppError


class OrderInvalid(AppError):
    """The order request is malformed or names things that do not exist (a ``400``).

    ``code`` is machine-readable (the first problem found), ``detail`` is for people, and
    ``fields`` maps each offending input path (``items[1].quantity``,
    ``shipping_address.country``) to its messages, so a client can point at every problem at
    once.
    """

    def __init__(self, code: str, detail: str, fields: dict[str, list[str]] | None = None):
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail
        self.fields = fields or {}
