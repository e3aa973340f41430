"""``/api/v1/webhooks/``: a client's webhook endpoints.

A client sees and deletes only its own endpoints (another client's is a ``404``). The signing
secret is in the response that creates the endpoint and in the one that rotates it, never
again. Authentication, permissions and throttling are the project's defaults.
"""

from __future__ import annotations

import uuid

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiExample,
    OpenApiParameter,
    OpenApiResponse,
    extend_schema,
    extend_schema_view,
)
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import NotFound
from rest_framework.request import Request
from rest_framework.response import Response

from config.api import (
    BodyReadFirst,
    ErrorSerializer,
    Pagination,
    StrictCharField,
    signed_in_user,
)
from config.api_errors import ApiError
from config.idempotency import MAX_KEY_LENGTH, clean_key, request_fingerprint
from config.text import header_text
from webhooks.models import EVENT_TYPES, Endpoint
from webhooks.services import (
    EndpointBusy,
    EndpointInvalid,
    endpoint_create,
    endpoint_delete,
    endpoint_rotate_secret,
)

EVENT_TYPE_CHOICES = [(e, e) for e in EVENT_TYPES]


class EndpointInputSerializer(serializers.Serializer):
    url = StrictCharField(
        max_length=2000,
        help_text="`https` only, on a public address (plain `http` and local addresses only "
        "where WEBHOOKS_ALLOW_PRIVATE is on).",
    )
    events = serializers.ListField(
        child=serializers.ChoiceField(choices=EVENT_TYPE_CHOICES),
        allow_empty=False,
        max_length=len(EVENT_TYPES),
    )


class EndpointSerializer(serializers.ModelSerializer):
    events = serializers.ListField(child=serializers.ChoiceField(choices=EVENT_TYPE_CHOICES))

    class Meta:
        model = Endpoint
        fields = ["id", "url", "events", "is_active", "created_at"]


class EndpointWithSecretSerializer(EndpointSerializer):
    secret = serializers.CharField(
        help_text="Signs every delivery (`Sagarunner-Signature`). Shown only this once."
    )

    class Meta(EndpointSerializer.Meta):
        fields = [*EndpointSerializer.Meta.fields, "secret"]


ENDPOINT_ID = OpenApiParameter("id", OpenApiTypes.UUID, OpenApiParameter.PATH)
ENDPOINT_EXAMPLE = OpenApiExample(
    "Tell my shop when orders settle",
    value={
        "url": "https://shop.example.com/hooks/sagarunner",
        "events": ["order.confirmed", "order.cancelled"],
    },
    request_only=True,
)


@extend_schema_view(
    list=extend_schema(summary="List your webhook endpoints", tags=["webhooks"]),
    retrieve=extend_schema(
        summary="Get a webhook endpoint", tags=["webhooks"], parameters=[ENDPOINT_ID]
    ),
    create=extend_schema(
        summary="Register a webhook endpoint",
        description="The `201` shows the signing `secret`, once. With an `Idempotency-Key`, "
        "a retry whose answer was lost gets the same endpoint and its secret again (`201`, "
        "`Idempotent-Replayed: true`) instead of a second endpoint; the same key with another "
        "body is `422 idempotency_key_reused`. A key stays the endpoint's while it exists.",
        tags=["webhooks"],
        parameters=[
            OpenApiParameter(
                "Idempotency-Key",
                {"type": "string", "minLength": 1, "maxLength": MAX_KEY_LENGTH},
                OpenApiParameter.HEADER,
                required=False,
            )
        ],
        request=EndpointInputSerializer,
        examples=[ENDPOINT_EXAMPLE],
        responses={
            201: EndpointWithSecretSerializer,
            400: OpenApiResponse(
                ErrorSerializer,
                description="Refused URL (`https_required`, `private_address`, "
                "`unresolvable_host`, `invalid_url`) or events.",
            ),
        },
    ),
    destroy=extend_schema(
        summary="Delete a webhook endpoint (its pending deliveries go with it)",
        tags=["webhooks"],
        parameters=[ENDPOINT_ID],
    ),
)
class EndpointViewSet(
    BodyReadFirst,
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.DestroyModelMixin,
    viewsets.GenericViewSet,
):
    serializer_class = EndpointSerializer
    pagination_class = Pagination
    filter_backends: list = []
    lookup_value_regex = "[^/]+"

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):  # schema generation: no user
            return Endpoint.objects.none()
        return Endpoint.objects.filter(owner=signed_in_user(self.request)).order_by(
            "-created_at", "id"
        )

    def get_object(self) -> Endpoint:
        try:
            uuid.UUID(str(self.kwargs["pk"]))
        except ValueError:
            raise NotFound() from None  # a malformed id is unknown, like any other
        return super().get_object()

    def perform_destroy(self, instance: Endpoint) -> None:
        try:
            endpoint_delete(endpoint=instance)
        except EndpointBusy:
            raise ApiError(
                "Events keep arriving for this endpoint; it is disabled now and gets no new "
                "events. Try again.",
                code="endpoint_busy",
                status_code=409,
            ) from None

    def create(self, request: Request) -> Response:
        key = clean_key(header_text(request, "Idempotency-Key"))
        serializer = EndpointInputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        try:
            endpoint, secret, replayed = endpoint_create(
                owner=request.user,
                key=key,
                fingerprint=request_fingerprint(request.data) if key is not None else "",
                **serializer.validated_data,
            )
        except EndpointInvalid as exc:
            raise ApiError(exc.detail, code=exc.code, fields={exc.field: [exc.detail]}) from None
        body = EndpointWithSecretSerializer({**EndpointSerializer(endpoint).data, "secret": secret})
        headers = {"Location": f"/api/v1/webhooks/{endpoint.id}/"}
        if replayed:
            headers["Idempotent-Replayed"] = "true"
        return Response(body.data, status=status.HTTP_201_CREATED, headers=headers)

    @extend_schema(
        summary="Rotate the signing secret",
        description="The `200` shows the new secret, once. The old one keeps signing (a second "
        "`v1=` in the header) for WEBHOOKS_SECRET_GRACE seconds; each replaced secret keeps its "
        "own grace, at most three at once.",
        tags=["webhooks"],
        request=None,
        parameters=[ENDPOINT_ID],
        responses={200: EndpointWithSecretSerializer},
    )
    @action(detail=True, methods=["post"], url_path="rotate-secret")
    def rotate_secret(self, request: Request, pk: str) -> Response:
        endpoint = self.get_object()
        secret = endpoint_rotate_secret(endpoint=endpoint)
        body = EndpointWithSecretSerializer({**EndpointSerializer(endpoint).data, "secret": secret})
        return Response(body.data)
