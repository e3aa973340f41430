"""Writes of the catalog by staff: create a product, change one.

Kept apart from :mod:`inventory.services` (which holds and releases stock for sagas): these are
people editing data, and their one hard rule is that stock on hand may never drop below what
open orders have reserved (the database enforces it too; here it becomes a clear ``400``
instead of an integrity error). Each write is an audit entry (``object.added`` /
``object.changed``, the shape the ops console writes) in the same transaction, naming the staff
member, the product, the fields that changed and the address the request came from.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.utils.text import capfirst, get_text_list

from audit.services import audit_object_change
from config.money import pair_problem
from inventory.models import Product

EDITABLE_FIELDS = ("name", "price", "currency", "stock_on_hand")


def _labels(names: list[str]) -> list[str]:
    """The fields as the ops console's change messages name them ("Stock on hand")."""
    fields = {field.name: field for field in Product._meta.concrete_fields}
    return [str(capfirst(fields[name].verbose_name)) for name in names]


def product_create(
    *,
    actor: Any,
    sku: str,
    name: str,
    price: Decimal,
    currency: str = "EUR",
    stock_on_hand: int = 0,
) -> Product:
    """Add a product to the catalog; a taken sku is a validation error on ``sku``."""
    try:
        with transaction.atomic():
            product = Product.objects.create(
                sku=sku, name=name, price=price, currency=currency, stock_on_hand=stock_on_hand
            )
            audit_object_change(
                "added",
                product,
                actor=actor,
                fields=_labels(["sku", *EDITABLE_FIELDS]),
                message="Added.",
            )
            return product
    except IntegrityError:
        if Product.objects.filter(sku=sku).exists():
            raise ValidationError({"sku": ["A product with this sku already exists."]}) from None
        raise


@transaction.atomic
def product_update(*, actor: Any, sku: str, changes: dict[str, Any]) -> Product:
    """Change a product's name, price, currency or stock on hand.

    Only fields whose value differs are written and recorded; a change that changes nothing
    writes nothing and leaves no audit entry.

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
                    f"Open orders have reserved {product.reserved} "
                    f"{'unit' if product.reserved == 1 else 'units'}; stock on hand cannot "
                    "go below that."
                ]
            }
        )
    # Asked again here, under the lock: two changes checked each against the other's old value
    # (a price of 10.50, a currency of JPY) must not store a pair neither allowed.
    found = pair_problem(
        changes, changes.get("price", product.price), changes.get("currency", product.currency)
    )
    if found:
        field, problem = found
        raise ValidationError({field: [problem]})
    changed = [name for name, value in changes.items() if getattr(product, name) != value]
    for name in changed:
        setattr(product, name, changes[name])
    if changed:
        product.save(update_fields=[*changed, "updated_at"])
        labels = _labels(changed)
        audit_object_change(
            "changed",
            product,
            actor=actor,
            fields=labels,
            message=f"Changed {get_text_list(labels, 'and')}.",
        )
    return product
