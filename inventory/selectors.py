"""Reads of stock and reservations, kept apart from the writes in :mod:`inventory.services`."""

from __future__ import annotations

from collections.abc import Iterable

from django.db.models import QuerySet

from inventory.models import Product, Reservation


def product_list(*, skus: Iterable[str] | None = None) -> QuerySet[Product]:
    qs = Product.objects.all()
    if skus is not None:
        qs = qs.filter(sku__in=list(skus))
    return qs.order_by("sku")


def reservation_get(*, key: str) -> Reservation | None:
    """The reservation (or tombstone) written under a step's forward key, if any."""
    return Reservation.objects.filter(key=key).prefetch_related("lines__product").first()
