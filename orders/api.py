"""``/api/v1/orders/``: place orders (with idempotency keys), follow them, cancel them.

Views stay thin: a serializer checks the request's shape, :mod:`orders.services` places or
cancels, a serializer renders. A client sees only its own orders (another client's order is a
``404``, not a ``403``); staff see all.

The order's ``status``, ``step`` and ``cancellation_reason`` come from its saga
(:func:`orders.selectors.order_state`); payment amounts and the shipment are read from the
participants' tables in one query each per page, so the detail view runs a constant number of
queries and the list view has no N+1.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from django.db import transaction
from django.utils.http import parse_etags, quote_etag
from django_filters import rest_framework as filters
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiExample,
    OpenApiParameter,
    OpenApiResponse,
    extend_schema,
    extend_schema_view,
)
from rest_framework import exceptions, generics, permissions, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.renderers import JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response

from accounts.throttling import OrderRateThrottle, check
from audit.services import audit_record
from config.api import (
    BodyReadFirst,
    ErrorSerializer,
    Pagination,
    StrictCharField,
    StrictIntegerField,
    signed_in_user,
)
from config.idempotency import MAX_KEY_LENGTH, clean_key, request_fingerprint
from config.text import header_text
from orders import idempotency
from orders.countries import country_problem
from orders.errors import OrderInvalid
from orders.models import Order
from orders.representation import (
    ORDER_STATUS_CHOICES,
    OrderSerializer,
    attach_payments_and_shipments,
)
from orders.selectors import order_list, order_status_expression
from orders.services import (
    MAX_LINES,
    MAX_QUANTITY,
    PAYMENT_METHODS,
    order_check_signal,
    order_create,
    order_request_cancel,
    order_signal_refused,
)
from orders.timeline import customer_event
from sagas.api import (
    SIGNAL_KEY_PARAMETER,
    SIGNAL_NAME,
    SIGNAL_REFUSED,
    SignalInputSerializer,
    SignalSerializer,
    send_signal,
)
from sagas.models import SagaEvent
from sagas.public import SagaOperationRefused


# ---------------------------------------------------------------------------------------------
# Input
# ---------------------------------------------------------------------------------------------
class OrderItemInputSerializer(serializers.Serializer):
    sku = StrictCharField(max_length=64)
    quantity = StrictIntegerField(min_value=1, max_value=MAX_QUANTITY)


class ShippingAddressSerializer(serializers.Serializer):
    name = StrictCharField(max_length=200)
    line1 = StrictCharField(max_length=200)
    city = StrictCharField(max_length=100)
    postal_code = StrictCharField(max_length=20)
    country = StrictCharField(
        min_length=2, max_length=2, help_text="ISO 3166-1 alpha-2 (e.g. `GB`); `AQ` is unserved."
    )

    def validate_country(self, value: str) -> str:
        value = value.upper()
        problem = country_problem(value)
        if problem:
            raise serializers.ValidationError(problem)
        return value


class OrderCreateSerializer(serializers.Serializer):
    """The request body, for the API's schema: ``order_create`` does the checking."""

    # DRF hands max_length to the list serializer that many=True makes; the stubs' __init__
    # does not list it.
    items = OrderItemInputSerializer(  # type: ignore[call-arg]
        many=True, allow_empty=False, max_length=MAX_LINES
    )
    payment_method = serializers.ChoiceField(choices=PAYMENT_METHODS)
    shipping_address = ShippingAddressSerializer()


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------
class TimelineEventSerializer(serializers.ModelSerializer):
    class Meta:
        model = SagaEvent
        fields = ["at", "kind", "step", "attempt", "detail", "actor"]


# ---------------------------------------------------------------------------------------------
# Views
# ---------------------------------------------------------------------------------------------
class OrderFilter(filters.FilterSet):
    status = filters.ChoiceFilter(
        choices=ORDER_STATUS_CHOICES, method="filter_status", label="status"
    )

    class Meta:
        model = Order
        fields = ["status"]

    def filter_status(self, queryset, name: str, value: str):
        return queryset.annotate(_status=order_status_expression()).filter(_status=value)


IDEMPOTENCY_KEY_PARAMETER = OpenApiParameter(
    "Idempotency-Key",
    {"type": "string", "minLength": 1, "maxLength": MAX_KEY_LENGTH},
    OpenApiParameter.HEADER,
    required=False,
    description=(
        "Makes the request safe to retry: the same key with the same body returns the first "
        "response (with `Idempotent-Replayed: true`); with another body `422`; while the "
        "first request is still running `409`. Per user, kept at least 24 hours."
    ),
)
REPLAYED_HEADER = OpenApiParameter(
    "Idempotent-Replayed",
    {"type": "string", "enum": ["true"]},
    OpenApiParameter.HEADER,
    response=[201],
    description="Present on a replayed response.",
)
LOCATION_HEADER = OpenApiParameter(
    "Location", str, OpenApiParameter.HEADER, response=[201], description="The order's URL."
)
ETAG_HEADER = OpenApiParameter(
    "ETag", str, OpenApiParameter.HEADER, response=[200, 304], description="A weak ETag."
)
IF_NONE_MATCH_PARAMETER = OpenApiParameter(
    "If-None-Match",
    str,
    OpenApiParameter.HEADER,
    required=False,
    description="An ETag from an earlier response: `304` with no body if nothing changed.",
)
ORDER_ID_PARAMETER = OpenApiParameter("id", OpenApiTypes.UUID, OpenApiParameter.PATH)
ORDER_EXAMPLE = OpenApiExample(
    "Two mugs to London",
    value={
        "items": [{"sku": "SR-MUG", "quantity": 2}],
        "payment_method": "pm_card_visa",
        "shipping_address": {
            "name": "Ada Lovelace",
            "line1": "12 St James's Square",
            "city": "London",
            "postal_code": "SW1Y 4JH",
            "country": "GB",
        },
    },
    request_only=True,
)
ERROR = ErrorSerializer


@extend_schema_view(
    list=extend_schema(
        summary="List orders (yours; staff: all)",
        description="A client's own orders, newest first, each as `GET /orders/{id}/` shows "
        "it; staff see every client's. `status` keeps the orders in one status (`processing`, "
        "`requires_action`, `confirmed`, `cancelling`, `cancelled`, `needs_attention`).",
        tags=["orders"],
    ),
    retrieve=extend_schema(
        summary="Get an order",
        description="One order, for its own client (another client's order is `404`) or "
        "staff: its status and current step, items, total, payment and shipment, and why it "
        "was cancelled. Poll it while the order is `processing`: send the weak `ETag` back as "
        "`If-None-Match` to get a `304` while nothing changed.",
        tags=["orders"],
        parameters=[ORDER_ID_PARAMETER, IF_NONE_MATCH_PARAMETER, ETAG_HEADER],
        responses={
            200: OrderSerializer,
            304: OpenApiResponse(description="Not modified since the ETag in If-None-Match."),
            412: OpenApiResponse(
                ERROR,
                description="If-Match given (other than `*`): an order's ETag is weak, so it "
                "never matches (`precondition_failed`); poll with If-None-Match. "
                "If-Unmodified-Since is ignored: an order has no modification date.",
            ),
        },
    ),
    create=extend_schema(
        summary="Place an order",
        description="A client orders products of the catalog, paid with a `payment_method` "
        "and shipped to a `shipping_address`. `201`: the order is `processing` and its saga "
        "reserves the stock, authorizes the payment, arranges the shipment and captures the "
        "payment; the order then reads `confirmed`, or `cancelled` with its "
        "`cancellation_reason` once what was done is undone (follow it with `GET "
        "/orders/{id}/` or a webhook). An invalid order is `400` with every problem at once, "
        "each under its path in `fields`. Send an `Idempotency-Key` to retry safely.",
        tags=["orders"],
        request=OrderCreateSerializer,
        examples=[ORDER_EXAMPLE],
        parameters=[IDEMPOTENCY_KEY_PARAMETER, REPLAYED_HEADER, LOCATION_HEADER],
        responses={
            201: OrderSerializer,
            400: OpenApiResponse(ERROR, description="Invalid order (code and fields say why)."),
            409: OpenApiResponse(ERROR, description="A request with this key is in flight."),
            422: OpenApiResponse(ERROR, description="This key was used with another body."),
        },
    ),
)
class OrderViewSet(BodyReadFirst, viewsets.GenericViewSet):
    # An order's body is refused in the order's own words, after its key and its limit.
    checks_own_body = ("create",)
    takes_no_fields = {"cancel": "a cancel"}
    permission_classes = [permissions.IsAuthenticated]
    serializer_class = OrderSerializer
    pagination_class = Pagination
    filterset_class = OrderFilter
    lookup_value_regex = "[^/]+"

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):  # schema generation: no user
            return Order.objects.none()
        return order_list(user=self.request.user)

    # -- read ---------------------------------------------------------------------------------
    def list(self, request: Request) -> Response:
        queryset = self.filter_queryset(self.get_queryset())
        page = self.paginate_queryset(queryset)
        assert page is not None  # None only without a pagination_class
        attach_payments_and_shipments(page)
        return self.get_paginated_response(OrderSerializer(page, many=True).data)

    def retrieve(self, request: Request, pk: str) -> Response:
        order = self.get_object()
        attach_payments_and_shipments([order])
        data = OrderSerializer(order).data
        etag = _weak_etag(data)
        headers = {"ETag": etag, "Cache-Control": "private, no-cache", "Vary": "Authorization"}
        if not _if_match_passes(request, etag):
            raise PreconditionFailed()
        if not _if_none_match_passes(request, etag):
            return Response(status=status.HTTP_304_NOT_MODIFIED, headers=headers)
        return Response(data, headers=headers)

    @extend_schema(
        summary="The order's timeline, oldest first",
        description="Every step attempt, retry, compensation and ops action. Staff see each "
        "event as recorded; the order's own client sees the same events in customer-safe "
        "words: operators as `support`, itself as `customer`, the engine as `system`, and a "
        "fixed sentence per kind instead of notes, provider errors or internal ids.",
        tags=["orders"],
        parameters=[ORDER_ID_PARAMETER],
        responses={200: TimelineEventSerializer(many=True)},
    )
    @action(detail=True, methods=["get"], filter_backends=[])
    def timeline(self, request: Request, pk: str) -> Response:
        order = self.get_object_light()
        events = SagaEvent.objects.filter(saga_id=order.saga_id).order_by("id")
        page = self.paginate_queryset(events)
        data = TimelineEventSerializer(page, many=True).data
        if not request.user.is_staff:
            # The order's own client: the same events in customer-safe words.
            me = f"user:{request.user.get_username()}"
            return self.get_paginated_response([customer_event(e, customer=me) for e in data])
        return self.get_paginated_response(data)

    # -- write --------------------------------------------------------------------------------
    def create(self, request: Request) -> Response:
        key = clean_key(header_text(request, "Idempotency-Key"))
        data = request.data  # a malformed body is a 400 here, before the key is touched
        claim = None
        if key is not None:
            outcome = idempotency.idempotency_begin(
                user=request.user, key=key, fingerprint=request_fingerprint(data)
            )
            if isinstance(outcome, idempotency.Replay):
                return _replay(outcome)
            claim = outcome
        try:
            # Only a request that may place an order counts against the order limit: a replay
            # returned above, and a throttled request frees its key below.
            check(OrderRateThrottle(), request, self)
            if not isinstance(data, Mapping):
                raise OrderInvalid(
                    "invalid",
                    "The body must be a JSON object with items, payment_method and "
                    "shipping_address.",
                    {"non_field_errors": ["Expected a JSON object."]},
                )
            with transaction.atomic():
                # order_create checks the input (the one place it is checked).
                order = order_create(
                    owner=request.user,
                    items=data.get("items"),
                    payment_method=data.get("payment_method"),
                    shipping_address=data.get("shipping_address"),
                    body_fields=data,
                )
                body = OrderSerializer(order).data
                if claim is not None:
                    rendered = JSONRenderer().render(body).decode()
                    idempotency.idempotency_finish(
                        claim=claim, status=201, body=rendered, order=order
                    )
        except BaseException:
            if claim is not None:
                idempotency.idempotency_release(claim=claim)
            raise
        return Response(body, status=status.HTTP_201_CREATED, headers=_location(order.id))

    @extend_schema(
        summary="Ask to cancel the order",
        description=(
            "`202`: the saga compensates at its next step boundary (the order turns "
            "`cancelling`, then `cancelled` with `customer_cancelled`). `409` once the saga "
            "has passed `capture_payment` or has finished."
        ),
        tags=["orders"],
        request=None,
        parameters=[ORDER_ID_PARAMETER],
        responses={
            202: OrderSerializer,
            409: OpenApiResponse(
                ERROR,
                description="Not cancelled: `pivot_reached` (past `capture_payment`), "
                "`not_running` (the order has settled), `definition_missing` (this server is "
                "behind a release; try again shortly).",
            ),
        },
    )
    @action(detail=True, methods=["post"], filter_backends=[])
    def cancel(self, request: Request, pk: str) -> Response:
        order = self.get_object_light()
        with transaction.atomic():
            order_request_cancel(order=order, actor=request.user)
            if order.owner_id != request.user.pk:
                # Staff cancelling a client's order: the saga's timeline names them, and the
                # audit log, where staff's other actions on clients' orders are, has it too.
                audit_record(
                    "order.cancel",
                    actor=request.user,
                    target=f"order:{order.pk}",
                    detail={"owner": order.owner_id, "saga": str(order.saga_id)},
                    request=request,
                )
        order = self.get_queryset().get(pk=order.pk)
        attach_payments_and_shipments([order])
        return Response(OrderSerializer(order).data, status=status.HTTP_202_ACCEPTED)

    @extend_schema(
        summary="Answer the order's saga (e.g. a 3-D Secure confirmation)",
        description=(
            "While the order is `requires_action`: `POST .../signals/3ds_confirmed/` with "
            '`{"payload": {"approved": true}}` (or `false`, which declines the payment). '
            "`202` when the order waits for it (or will); the same `Idempotency-Key` again is "
            "a `202` replay (`422` with another payload); `409` when the order can no longer "
            "take it, or `409 definition_missing` when this server cannot take it yet (during "
            "a deploy: send it again shortly)."
        ),
        tags=["orders"],
        request=SignalInputSerializer,
        parameters=[ORDER_ID_PARAMETER, SIGNAL_NAME, SIGNAL_KEY_PARAMETER],
        responses={202: SignalSerializer, 400: ERROR, 403: ERROR, 409: SIGNAL_REFUSED, 422: ERROR},
    )
    @action(
        detail=True,
        methods=["post"],
        url_path=r"signals/(?P<name>[A-Za-z0-9_.:-]{1,64})",
        filter_backends=[],
    )
    def signal(self, request: Request, pk: str, name: str) -> Response:
        order = self.get_object_light()
        try:
            order_check_signal(order=order)  # the caller's order: retryable, not denied
            return send_signal(request, order.saga_id, name)
        except SagaOperationRefused as refused:
            # The engine speaks of sagas; the client asked about an order.
            raise order_signal_refused(order=order, name=name, refused=refused) from None

    def get_object_light(self) -> Order:
        """The order (same visibility rule: another client's order is a 404) without its
        items or saga: one small query."""
        queryset = Order.objects.only("id", "saga_id", "owner_id")
        if not self.request.user.is_staff:
            queryset = queryset.filter(owner=signed_in_user(self.request))
        order = generics.get_object_or_404(queryset, pk=self.kwargs["pk"])
        self.check_object_permissions(self.request, order)
        return order


def _location(order_id) -> dict[str, str]:
    return {"Location": f"/api/v1/orders/{order_id}/"}


def _replay(replay: idempotency.Replay) -> Response:
    headers = {"Idempotent-Replayed": "true"}
    if replay.order_id is not None:
        headers.update(_location(replay.order_id))
    return Response(json.loads(replay.body), status=replay.status, headers=headers)


def _weak_etag(data: Any) -> str:
    digest = hashlib.sha256(JSONRenderer().render(data)).hexdigest()[:32]
    return "W/" + quote_etag(digest)


# The order's preconditions (RFC 9110 §13.2.2) are evaluated here rather than by Django's
# get_conditional_response, which fails If-Unmodified-Since whenever no Last-Modified is
# given. An order has no modification date to send (its representation joins the order, its
# saga and the participants' rows), and a recipient must ignore If-Unmodified-Since (§13.1.4)
# and If-Modified-Since (§13.1.3) for a resource without one: only the ETag headers count.
def _if_match_passes(request: Request, etag: str) -> bool:
    """If-Match compares strongly (§13.1.1), so the order's weak ETag matches only ``*``."""
    tags = parse_etags(request.META.get("HTTP_IF_MATCH", ""))
    if not tags or tags == ["*"]:
        return True
    return not etag.startswith("W/") and etag in tags


def _if_none_match_passes(request: Request, etag: str) -> bool:
    """If-None-Match compares weakly (§13.1.2): a match (or ``*``) means not modified."""
    tags = parse_etags(request.META.get("HTTP_IF_NONE_MATCH", ""))
    if not tags:
        return True
    if tags == ["*"]:
        return False
    return _opaque(etag) not in {_opaque(tag) for tag in tags}


def _opaque(etag: str) -> str:
    return etag.removeprefix("W/")


class PreconditionFailed(exceptions.APIException):
    status_code = status.HTTP_412_PRECONDITION_FAILED
    # Not "the order changed": If-Match compares strongly, so even the current (weak) ETag
    # fails it.
    default_detail = (
        "If-Match compares ETags strongly and an order's ETag is weak, so it never matches; "
        "poll with If-None-Match instead."
    )
    default_code = "precondition_failed"
