"""Shipping's definite answers: each carries a machine-readable ``code`` and is never retried."""

from __future__ import annotations

from config.errors import AppError


class ShippingError(AppError):
    """A business "no" from the carrier; asking again with the same key gets it again."""

    code = "shipping_error"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class ShippingUnavailable(ShippingError):
    """No carrier serves the destination country."""

    code = "shipping_unavailable"

    def __init__(self, country: str) -> None:
        super().__init__(f"no carrier serves {country!r}")
        self.country = country


class ShipmentRefused(ShippingError):
    """An arrange arrived under a key whose shipment was already cancelled.

    The cancel got there first (it may have left a tombstone); arranging now would ship an
    order that nobody is left to cancel.
    """

    code = "already_compensated"
