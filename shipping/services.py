"""A fake carrier: arranging and cancelling shipments, each safe to repeat and to race.

The shipment row, keyed by the saga step's forward key, is the whole trick: a repeat finds it
under its key, a racing arrange with the same key waits on its unique index and then finds
it, and a cancel that gets there before the arrange writes it as a tombstone so the arrange
is refused. A booking's id and tracking number derive from that key too, so a booking lost
and made again is the same booking.
"""

from __future__ import annotations

import hashlib
import uuid
import zlib
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction

from config.db import RowBy, insert_unless_taken, update_row
from sagas.faults import fault_point
from shipping.errors import ShipmentRefused, ShippingUnavailable
from shipping.models import Shipment, ShipmentStatus

CARRIERS = ("DHL", "UPS", "PostNL", "GLS")
#: Destinations no carrier serves (a deterministic outcome for demos and tests).
UNSERVED_COUNTRIES = frozenset({"AQ"})


def carrier_for(country: str) -> str:
    """Same country, same carrier: stable across processes (unlike ``hash``)."""
    return CARRIERS[zlib.crc32(country.encode()) % len(CARRIERS)]


#: The namespace of shipment ids derived from their keys (:func:`_booking`).
_SHIPMENT_IDS = uuid.UUID("5b0f6a4e-3c1d-4f7a-9e2b-8d6c4a1f0e37")


def _booking(key: str, carrier: str) -> tuple[uuid.UUID, str]:
    """The shipment id and tracking number a booking under ``key`` gets, always the same ones.

    A carrier replays a request under its idempotency key with the booking it made; so does
    this one, even for a booking it lost: a server crash that lost the row (its commit does
    not wait for the disk, see :func:`shipment_arrange`) lost the step's record after it too,
    and the step's retry books again under the same key, the same shipment with the same
    tracking number, so nobody who read the first one sees it change.
    """
    digest = hashlib.sha256(key.encode()).hexdigest()
    return uuid.uuid5(_SHIPMENT_IDS, key), f"{carrier.upper()}{digest[:16].upper()}"


# Every call reads a shipment by its key: the SQL is built once (config.db.RowBy).
_shipment = RowBy(Shipment.objects.all(), "key")
_shipment_for_update = RowBy(Shipment.objects.select_for_update(), "key")


@fault_point("shipping.arrange")
def shipment_arrange(*, key: str, order_id: uuid.UUID | str, country: str) -> dict[str, Any]:
    """Book a carrier; raises :class:`ShippingUnavailable` for an unserved country.

    The refusal is recorded under the key like a shipment, so a repeat gets the same answer.
    Called as a worker calls it (autocommit, PostgreSQL), the booking's commit does not wait
    for the disk (``SAGA_ASYNC_LEASE_COMMITS``): this table is the carrier's own book, whose
    durability a real deployment's database does not pay for, and a booking lost in a server
    crash is booked again, identically, by the step's retry (:func:`_booking`). Whatever tells
    anyone about it (a webhook, the saga's end) commits later and waits, flushing it first.
    """
    order_uuid = uuid.UUID(str(order_id))
    country = country.strip().upper()
    if len(country) != 2 or not country.isalpha():
        raise ValueError(f"country must be an ISO 3166-1 alpha-2 code, got {country!r}")

    fields: dict[str, Any]
    if country in UNSERVED_COUNTRIES:
        fields = {"status": ShipmentStatus.REFUSED}
        shipment_id = uuid.uuid5(_SHIPMENT_IDS, key)
    else:
        carrier = carrier_for(country)
        shipment_id, tracking = _booking(key, carrier)
        fields = {
            "status": ShipmentStatus.ARRANGED,
            "carrier": carrier,
            "tracking_number": tracking,
        }
    shipment = Shipment(id=shipment_id, key=key, order_id=order_uuid, country=country, **fields)
    # Inserted first, read only if the key is taken: a repeat, another arrange with this key,
    # or a cancel's tombstone got there first (one round trip for a first call, not two).
    if insert_unless_taken(shipment, wait_flush=not settings.SAGA_ASYNC_LEASE_COMMITS):
        return _replay(shipment)
    existing = _shipment(key)
    if existing is None:  # another unique value (a tracking number) was taken
        raise IntegrityError(f"shipment under {key!r}: a unique value is taken")
    return _replay(existing)


@fault_point("shipping.cancel")
def shipment_cancel(*, key: str, forward_key: str) -> dict[str, Any]:
    """Cancel the shipment arranged under ``forward_key``; repeatable.

    If nothing was arranged under that key, this succeeds and leaves a tombstone, so a late
    arrange cannot book a carrier for a cancelled order.
    """
    return _cancel(key, forward_key)


def shipment_cancel_done_by_hand(*, key: str, forward_key: str) -> dict[str, Any]:
    """Record that a person cancelled the booking under ``forward_key`` with the carrier (its
    dashboard) after every cancel the saga sent failed: the shipment reads ``cancelled``, by
    ``key`` (the undo's), as the saga's own cancel would have left it, instead of a booking
    with a tracking number for a cancelled order. Repeatable like a cancel, and outside
    ``SAGA_FAULTS`` and outages: no call goes to the carrier, this is our record of it."""
    return _cancel(key, forward_key)


def _cancel(key: str, forward_key: str) -> dict[str, Any]:
    with transaction.atomic():
        shipment = _shipment_for_update(forward_key)
        if shipment is None:
            try:
                with transaction.atomic():
                    shipment = Shipment.objects.create(
                        key=forward_key,
                        status=ShipmentStatus.CANCELLED,
                        tombstone=True,
                        cancelled_by_key=key,
                    )
                return _result(shipment, cancelled=False)
            except IntegrityError:
                # The arrange committed between our read and our insert: cancel it.
                shipment = Shipment.objects.select_for_update().get(key=forward_key)
        if shipment.status == ShipmentStatus.ARRANGED:
            shipment.status = ShipmentStatus.CANCELLED
            shipment.cancelled_by_key = key
            update_row(shipment, ["status", "cancelled_by_key", "updated_at"])
        # A refusal shipped nothing; a tombstone or a cancelled shipment needs nothing more.
        return _result(
            shipment,
            cancelled=shipment.status == ShipmentStatus.CANCELLED and not shipment.tombstone,
        )


def _replay(shipment: Shipment) -> dict[str, Any]:
    if shipment.status == ShipmentStatus.REFUSED:
        raise ShippingUnavailable(shipment.country)
    if shipment.status == ShipmentStatus.CANCELLED:
        raise ShipmentRefused(
            f"the shipment under {shipment.key!r} was already cancelled; "
            "an arrange under that key cannot take effect"
        )
    return _result(shipment)


def _result(shipment: Shipment, **extra: Any) -> dict[str, Any]:
    return {
        "shipment_id": str(shipment.id),
        "carrier": shipment.carrier,
        "tracking_number": shipment.tracking_number,
        "status": str(shipment.status),
        "tombstone": shipment.tombstone,
        **extra,
    }
