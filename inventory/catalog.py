"""Writes of the catalog by staff: create a product, change one.

Kept apart from :mod:`inventory.services` (which holds and releases stock for sagas): these are
people editing data, and their one hard rule is that stock on hand may never drop below what
open orders have reserved (the database enforces it too; here it becomes a clear ``400``
instead of an integrity error).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction

from inventory.models import Product

EDITABLE_FIELDS = ("name", "price", "currency", "stock_on_hand")


def product_create(
    *, sku: str, name: str, price: Decimal, currency: str = "EUR", stock_on_hand: int = 0
) -> Product:
    """Add a product to the catalog; a taken sku is a validation error on ``sku``."""
    try:
        with transaction.atomic():
            return Product.objects.create(
                sku=sku, name=name, price=price, currency=currency, stock_on_hand=stock_on_hand
            )
    except IntegrityError:
        if Product.objects.filter(sku=sku).exists():
            raise ValidationError({"sku": ["A product with this sku already exists."]}) from None
        raise


@transaction.atomic
def product_update(*, sku: str, changes: dict[str, Any]) -> Product:
    """Change a product's name, price, currency or stock on hand.

    The row is locked for the few milliseconds of the check and the write, so a reservation
    cannot slip in between and leave ``stock_on_hand < reserved``.
    """
    unknown = set(changes) - set(EDITABLE_FIELDS)
    if unknown:
        raise ValidationError({name: ["This field cannot be changed."] for name in sorted(unknown)})
    product = Product.objects.select_for_update().get(sku=sku)
    stock = changes.get("stock_on_hand")
    if stock is not None and stock < product.reserved:
        raise ValidationError(
            {
                "stock_on_hand": [
                    f"Open orders have reserved {product.reserved} units; stock on hand cannot "
                    "go below that."
                ]
            }
        )
    for name, value in changes.items():
        setattr(product, name, value)
    if changes:
        product.save(update_fields=[*changes, "updated_at"])
    return product
