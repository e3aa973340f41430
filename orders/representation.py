"""The order as its client sees it: one rendering for ``GET /orders/{id}/`` and the webhooks.

The API's responses and the ``data`` of a webhook event are the same serializer, so a client
never sees two shapes of one order. The order's ``status``, ``step`` and
``cancellation_reason`` come from its saga (:func:`orders.selectors.order_state`); payment
amounts and the shipment are read from the participants' tables in one query each for any
number of orders (:func:`attach_payments_and_shipments`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from orders.models import Order, OrderItem
from orders.selectors import OrderStatus, order_state
from orders.status import CANCELLATION_REASONS
from payments.selectors import payments_by_order
from sagas.models import SagaState
from shipping.models import Shipment, ShipmentStatus
from shipping.selectors import shipments_by_order

#: For the schema's enum names (SPECTACULAR_SETTINGS["ENUM_NAME_OVERRIDES"]).
ORDER_STATUS_CHOICES = [(s, s) for s in OrderStatus.ALL]


class OrderItemSerializer(serializers.ModelSerializer):
    unit_price = serializers.DecimalField(max_digits=12, decimal_places=2)

    class Meta:
        model = OrderItem
        fields = ["sku", "quantity", "unit_price"]


class SagaSummarySerializer(serializers.Serializer):
    id = serializers.UUIDField()
    state = serializers.ChoiceField(choices=SagaState.choices)
    current_step = serializers.CharField()


class PaymentAmountsSerializer(serializers.Serializer):
    """Amounts of the order's payment; all ``0.00`` before ``authorize_payment`` has run."""

    authorized = serializers.DecimalField(max_digits=12, decimal_places=2)
    captured = serializers.DecimalField(max_digits=12, decimal_places=2)
    voided = serializers.DecimalField(max_digits=12, decimal_places=2)
    refunded = serializers.DecimalField(max_digits=12, decimal_places=2)


class _NoneIfBlank(serializers.CharField):
    """A text column that holds ``""`` for "none yet", read as ``null``: a shipment no carrier
    took (``refused``) has no carrier and no tracking number, and an API client tests for
    ``null``, not for an empty string."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(allow_null=True, read_only=True, **kwargs)

    def to_representation(self, value: Any) -> str | None:  # type: ignore[override]
        return value or None


class ShipmentSerializer(serializers.ModelSerializer):
    status = serializers.ChoiceField(choices=ShipmentStatus.choices)
    carrier = _NoneIfBlank(help_text="The carrier that booked it; null if none did.")
    tracking_number = _NoneIfBlank(help_text="The carrier's tracking number; null if none.")

    class Meta:
        model = Shipment
        fields = ["id", "status", "carrier", "tracking_number"]


_ZERO = "0.00"


class OrderSerializer(serializers.ModelSerializer):
    status = serializers.SerializerMethodField()
    step = serializers.SerializerMethodField(help_text="The step being run while `processing`.")
    cancellation_reason = serializers.SerializerMethodField()
    total = serializers.DecimalField(max_digits=12, decimal_places=2)
    items = OrderItemSerializer(many=True)
    updated_at = serializers.SerializerMethodField(
        help_text="When the order or its saga last changed."
    )
    saga = SagaSummarySerializer()
    payment = serializers.SerializerMethodField()
    shipment = serializers.SerializerMethodField()

    class Meta:
        model = Order
        fields = [
            "id",
            "status",
            "step",
            "cancellation_reason",
            "total",
            "currency",
            "items",
            "created_at",
            "updated_at",
            "saga",
            "payment",
            "shipment",
        ]

    def to_representation(self, instance: Order) -> dict:
        # Read once per order for the three fields below, not once per field (a list
        # serializer calls this for each order in turn, then those fields).
        self._state_view = order_state(instance.saga)
        return super().to_representation(instance)

    @extend_schema_field(serializers.ChoiceField(choices=ORDER_STATUS_CHOICES))
    def get_status(self, order: Order) -> str:
        return self._state_view.status

    @extend_schema_field(serializers.CharField(allow_null=True))
    def get_step(self, order: Order) -> str | None:
        return self._state_view.step

    @extend_schema_field(serializers.ChoiceField(choices=CANCELLATION_REASONS, allow_null=True))
    def get_cancellation_reason(self, order: Order) -> str | None:
        return self._state_view.cancellation_reason

    @extend_schema_field(OpenApiTypes.DATETIME)
    def get_updated_at(self, order: Order) -> str:
        latest = max(order.updated_at, order.saga.updated_at)
        return serializers.DateTimeField().to_representation(latest)

    @extend_schema_field(PaymentAmountsSerializer)
    def get_payment(self, order: Order) -> dict:
        payment = order._payment
        if payment is None:
            return {"authorized": _ZERO, "captured": _ZERO, "voided": _ZERO, "refunded": _ZERO}
        return PaymentAmountsSerializer(
            {
                "authorized": payment.authorized_amount,
                "captured": payment.captured_amount,
                "voided": payment.voided_amount,
                "refunded": payment.refunded_amount,
            }
        ).data

    @extend_schema_field(ShipmentSerializer(allow_null=True))
    def get_shipment(self, order: Order) -> dict | None:
        shipment = order._shipment
        return None if shipment is None else ShipmentSerializer(shipment).data


def attach_payments_and_shipments(orders: Iterable[Order]) -> None:
    """Give each order ``_payment`` and ``_shipment``: two queries for any number of orders."""
    orders = list(orders)
    ids = [o.id for o in orders]
    if not ids:
        return
    payments = payments_by_order(order_ids=ids)
    shipments = shipments_by_order(order_ids=ids)
    for order in orders:
        order._payment = payments.get(order.id)
        order._shipment = shipments.get(order.id)
