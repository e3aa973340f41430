"""Inventory's definite answers: each carries a machine-readable ``code`` and is never retried."""

from __future__ import annotations

from config.errors import AppError


class InventoryError(AppError):
    """A business "no" from inventory; retrying the same request gets the same answer."""

    code = "inventory_error"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class OutOfStock(InventoryError):
    """A line cannot be held: not enough available stock, or no such product."""

    code = "out_of_stock"

    def __init__(self, sku: str, requested: int, available: int | None) -> None:
        if available is None:
            detail = f"unknown sku {sku!r}"
        else:
            detail = f"sku {sku!r}: requested {requested}, available {available}"
        super().__init__(detail)
        self.sku = sku
        self.requested = requested
        self.available = available


class ReservationRefused(InventoryError):
    """A reserve arrived under a key whose reservation was already released.

    The release got there first (it may have left a tombstone); taking effect now would hold
    stock that no compensation is left to give back.
    """

    code = "already_compensated"


class ReservationNotFound(InventoryError):
    """A commit names a key under which nothing was ever reserved."""

    code = "reservation_not_found"


class ReservationStateConflict(InventoryError):
    """The reservation has already gone the other way (commit after release, or vice versa)."""

    code = "reservation_state_conflict"
