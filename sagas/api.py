"""``/api/v1/sagas/``: staff read saga instances with their steps; ops staff operate them.

The operations (retry now, compensate, resolve with a note) are the engine's services, the same
the admin actions call: they check the ``sagas.operate_saga`` permission, refuse what makes no
sense in the saga's state (a ``409`` with the engine's code) and write a timeline event naming
the user. Staff without the permission can read everything here and get ``403`` on the
operations.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any

from django.utils import timezone
from django_filters import rest_framework as filters
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiParameter,
    OpenApiResponse,
    extend_schema,
    extend_schema_field,
    extend_schema_view,
)
from rest_framework import generics, mixins, permissions, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import NotFound
from rest_framework.request import Request
from rest_framework.response import Response

from config.api import (
    BodyReadFirst,
    ClosedInput,
    ErrorSerializer,
    Pagination,
    StrictBooleanField,
    StrictCharField,
    WrittenCharField,
)
from config.api_errors import ApiError
from config.text import header_text
from sagas import services
from sagas.exceptions import SignalPayloadInvalid
from sagas.models import Saga, SagaSignal, SagaState, SagaStep, StepStatus
from sagas.selectors import saga_is_stuck, saga_stuck_q
from sagas.signals import (
    MAX_KEY_LENGTH,
    SignalOutcome,
    check_may_send,
    may_signal_saga,
    saga_signal,
    signal_sent_under,
)


# ---------------------------------------------------------------------------------------------
# Serializers
# ---------------------------------------------------------------------------------------------
class SagaStepSerializer(serializers.ModelSerializer):
    status = serializers.ChoiceField(choices=StepStatus.choices)

    class Meta:
        model = SagaStep
        fields = [
            "index",
            "name",
            "status",
            "attempts",
            "idempotency_key",
            "took_effect",
            "maybe_effect",
            "compensation_attempts",
            "last_error",
            "updated_at",
        ]


class SagaSerializer(serializers.ModelSerializer):
    type = serializers.CharField(source="saga_type")
    state = serializers.ChoiceField(choices=SagaState.choices)
    stuck = serializers.SerializerMethodField(
        help_text="Active, overdue by more than SAGA_STUCK_AFTER, and no worker holds it."
    )
    # DRF's serializer metaclass moves declared fields out of the class, so this names the
    # "data" key without replacing Serializer.data; the stubs see an override.
    data = serializers.JSONField(  # type: ignore[assignment]
        help_text="The saga's input: ids, amounts and codes."
    )
    results = serializers.JSONField(help_text="Results of the forward steps, by step name.")
    steps = SagaStepSerializer(many=True)

    class Meta:
        model = Saga
        fields = [
            "id",
            "type",
            "state",
            "definition_version",
            "current_step",
            "step_index",
            "attempt",
            "stuck",
            "next_attempt_at",
            "lease_until",
            "deadline_at",
            "cancel_reason",
            "failure_code",
            "failed_step",
            "failed_undo",
            "last_error",
            "escalated_from",
            "correlation_id",
            "waiting_for",
            "waiting_since",
            "data",
            "results",
            "created_at",
            "updated_at",
            "finished_at",
            "steps",
        ]

    @extend_schema_field(OpenApiTypes.BOOL)
    def get_stuck(self, saga: Saga) -> bool:
        return saga_is_stuck(saga, now=self.context.get("now"))


PAYLOAD_NOT_AN_OBJECT = "The payload must be a JSON object."


class SignalInputSerializer(ClosedInput, serializers.Serializer):
    input_name = "a signal"

    payload = serializers.DictField(
        required=False,
        default=dict,
        help_text="What the saga's next steps get to read.",
        error_messages={"not_a_dict": PAYLOAD_NOT_AN_OBJECT},
    )


class SignalSerializer(serializers.ModelSerializer):
    saga_id = serializers.UUIDField()
    signal = serializers.CharField(source="name")
    replayed = serializers.SerializerMethodField(help_text="This key was seen before.")

    class Meta:
        model = SagaSignal
        fields = ["saga_id", "signal", "key", "payload", "received_at", "consumed_at", "replayed"]

    @extend_schema_field(OpenApiTypes.BOOL)
    def get_replayed(self, signal: SagaSignal) -> bool:
        return bool(self.context.get("replayed"))


SIGNAL_KEY_PARAMETER = OpenApiParameter(
    "Idempotency-Key",
    {"type": "string", "minLength": 1, "maxLength": MAX_KEY_LENGTH},
    OpenApiParameter.HEADER,
    required=False,
    description="The same key again is a replay: `202` with no second effect.",
)
SIGNAL_NAME = OpenApiParameter("name", str, OpenApiParameter.PATH)


def send_signal(request: Request, saga_id, name: str) -> Response:
    """``POST .../signals/{name}/`` for the sagas and the orders API: deliver, answer ``202``."""
    key = header_text(request, "Idempotency-Key")
    if key is not None and isinstance(request.data, Mapping):
        # A retry is answered before its body is checked: what a key delivered stays its
        # answer, whatever rule came in since (as for an order, a webhook registration).
        earlier = signal_sent_under(
            saga_id=saga_id,
            name=name,
            key=key,
            payload=request.data.get("payload", {}),
            user=request.user,
        )
        if earlier is not None:
            return _signal_sent(earlier)
    check_may_send(saga_id=saga_id, name=name, user=request.user)
    body = SignalInputSerializer(data=request.data)
    if not body.is_valid() and list(body.errors) == ["payload"]:
        # The same code whether the payload is not an object or an object the signal refuses.
        detail = PAYLOAD_NOT_AN_OBJECT
        raise ApiError(detail, code="invalid_payload", fields={"payload": [detail]})
    body.is_valid(raise_exception=True)
    try:
        outcome = saga_signal(
            saga_id=saga_id,
            name=name,
            payload=body.validated_data["payload"],
            key=key,
            user=request.user,
        )
    except SignalPayloadInvalid as exc:
        raise ApiError(exc.detail, code=exc.code, fields={"payload": [exc.detail]}) from None
    return _signal_sent(outcome)


def _signal_sent(outcome: SignalOutcome) -> Response:
    data = SignalSerializer(outcome.signal, context={"replayed": outcome.replayed}).data
    headers = {"Idempotent-Replayed": "true"} if outcome.replayed else {}
    return Response(data, status=status.HTTP_202_ACCEPTED, headers=headers)


class CompensateSerializer(ClosedInput, serializers.Serializer):
    input_name = "a compensation"

    reason = WrittenCharField(
        max_length=services.NOTE_MAX, help_text="Why; recorded in the timeline."
    )


class ResolveSerializer(ClosedInput, serializers.Serializer):
    input_name = "a resolution"

    note = WrittenCharField(
        max_length=services.NOTE_MAX, help_text="What a person did; in the timeline."
    )
    accept_effects = StrictBooleanField(
        default=False,
        help_text="Close it even though steps that took effect were not undone (they are "
        "named in the 409 effects_in_place); the stock reservation is released either way.",
    )


class UndoDoneSerializer(ClosedInput, serializers.Serializer):
    input_name = "an undo done by hand"

    step = StrictCharField(
        max_length=64, help_text="The step whose undo the saga waits on (its current_step)."
    )
    note = WrittenCharField(
        max_length=services.NOTE_MAX, help_text="How the undo was done by hand; in the timeline."
    )


class CompensationSerializer(serializers.Serializer):
    step = serializers.CharField()
    compensation = serializers.CharField()
    idempotency_key = serializers.CharField()
    status = serializers.ChoiceField(choices=StepStatus.choices)
    why = serializers.CharField(
        help_text="Why it is in the plan: it took effect, or an attempt answered with an error "
        "or got no answer and may have taken effect."
    )


class CompensationPlanSerializer(serializers.Serializer):
    saga_id = serializers.UUIDField()
    state = serializers.ChoiceField(choices=SagaState.choices)
    compensations = CompensationSerializer(
        many=True, help_text="What compensating now would run, in run order."
    )


# ---------------------------------------------------------------------------------------------
# Filters and permissions
# ---------------------------------------------------------------------------------------------
class SagaFilter(filters.FilterSet):
    state = filters.ChoiceFilter(choices=SagaState.choices)
    type = filters.CharFilter(field_name="saga_type", max_length=64)
    failed_step = filters.CharFilter(max_length=64)
    failed_undo = filters.CharFilter(max_length=64)
    correlation_id = filters.CharFilter(max_length=128)
    # A choice, not django-filter's BooleanFilter: that one ignores a value it cannot read
    # (``stuck=maybe`` listed every saga); this one answers 400 naming the field.
    stuck = filters.ChoiceFilter(
        choices=[("true", "true"), ("false", "false")], method="filter_stuck", label="stuck"
    )

    waiting_for = filters.CharFilter(
        max_length=64,
        method="filter_waiting_for",
        label="waiting_for",
        help_text="Parked sagas waiting for this signal (`*`: for any signal).",
    )
    waiting_longer_than = filters.NumberFilter(
        method="filter_waiting_longer_than",
        min_value=0,
        # Ten years: any longer is no saga's wait, and a larger number would overflow the
        # datetime arithmetic (a 400 naming the field, not a 500).
        max_value=10 * 365 * 24 * 3600,
        label="waiting_longer_than",
        help_text="Parked (at a Wait or Sleep) for more than this many seconds.",
    )

    class Meta:
        model = Saga
        fields = [
            "state",
            "type",
            "failed_step",
            "failed_undo",
            "correlation_id",
            "stuck",
            "waiting_for",
            "waiting_longer_than",
        ]

    def filter_waiting_for(self, queryset, name: str, value: str):
        if value == "*":
            return queryset.filter(waiting_since__isnull=False).exclude(waiting_for="")
        return queryset.filter(waiting_for=value, waiting_since__isnull=False)

    def filter_waiting_longer_than(self, queryset, name: str, value):
        since = timezone.now() - timedelta(seconds=float(value))
        return queryset.filter(waiting_since__lte=since)

    def filter_stuck(self, queryset, name: str, value: str):
        if not value:
            return queryset
        q = saga_stuck_q()
        return queryset.filter(q) if value == "true" else queryset.exclude(q)


class CanOperateSagas(permissions.BasePermission):
    """The ops permission (the "ops" group); checked before the body is even read."""

    message = "You need the 'operate sagas' permission (the ops group)."

    def has_permission(self, request: Request, view) -> bool:
        return bool(request.user and request.user.has_perm(services.OPS_PERMISSION))


# ---------------------------------------------------------------------------------------------
# Views
# ---------------------------------------------------------------------------------------------
SAGA_ID = OpenApiParameter("id", OpenApiTypes.UUID, OpenApiParameter.PATH)


def _ops_action(**kwargs: Any) -> Callable[[Callable[..., Response]], Any]:
    """A POST on one saga that needs the ops permission (checked before the body is read)."""
    return action(
        detail=True,
        methods=["post"],
        permission_classes=[permissions.IsAuthenticated, permissions.IsAdminUser, CanOperateSagas],
        filter_backends=[],
        **kwargs,
    )


def refused(*codes: str) -> OpenApiResponse:
    """A route's ``409``, naming every code the engine can refuse it with: a client generated
    from the schema learns them there (docs/api.md lists the same per route)."""
    named = ", ".join(f"`{code}`" for code in codes)
    return OpenApiResponse(
        ErrorSerializer, description=f"Refused in the saga's state; the code is one of {named}."
    )


SIGNAL_REFUSED = refused("not_waiting", "already_signalled", "unknown_signal", "definition_missing")


@extend_schema_view(
    list=extend_schema(
        summary="List sagas (staff)",
        description="For staff watching the engine: every saga, newest first, with its steps, "
        "as `GET /sagas/{id}/` shows it. The filters find the ones that need a look: `state` "
        "(`needs_manual`), `stuck=true`, `failed_step`, `failed_undo`, `waiting_for` a signal "
        "and `waiting_longer_than` some seconds, or one order's by `correlation_id`.",
        tags=["sagas"],
    ),
    retrieve=extend_schema(
        summary="Get a saga (staff)",
        description="For staff: one saga as the engine runs it: its state, current step and "
        "attempt, when it runs next, why it failed or what it waits for, its input and "
        "results, and each step's attempts, effects and compensations.",
        tags=["sagas"],
        parameters=[SAGA_ID],
    ),
)
class SagaViewSet(
    BodyReadFirst,
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    viewsets.GenericViewSet,
):
    permission_classes = [permissions.IsAuthenticated, permissions.IsAdminUser]
    serializer_class = SagaSerializer
    takes_no_fields = {"retry": "a retry"}
    pagination_class = Pagination
    filterset_class = SagaFilter
    lookup_value_regex = "[^/]+"

    def get_queryset(self):
        return Saga.objects.prefetch_related("steps").order_by("-created_at", "id")

    def get_serializer_context(self) -> dict:
        return {**super().get_serializer_context(), "now": timezone.now()}

    def _saga_response(self, saga_id, code: int) -> Response:
        saga = self.get_queryset().get(pk=saga_id)
        return Response(self.get_serializer(saga).data, status=code)

    def _operate(
        self,
        request: Request,
        service: Callable[..., Any],
        code: int,
        body: type[serializers.Serializer] | None = None,
    ) -> Response:
        """One ops action: the saga (404 if unknown), the body checked by ``body`` (400), the
        service called with the body's fields by name (409 when it refuses), the saga back.
        The services check whether the action is allowed; the API only translates."""
        saga = self.get_object()
        fields: dict[str, Any] = {}
        if body is not None:
            checked = body(data=request.data)
            checked.is_valid(raise_exception=True)
            fields = dict(checked.validated_data)
        service(saga_id=saga.pk, user=request.user, **fields)
        return self._saga_response(saga.pk, code)

    @extend_schema(
        summary="Retry now (ops)",
        description="Run the saga's next piece of work now: skip a backoff, or resume a saga "
        "in `needs_manual` where it stopped. `202`: a worker picks it up.",
        tags=["sagas"],
        request=None,
        parameters=[SAGA_ID],
        responses={
            202: SagaSerializer,
            409: refused("in_flight", "settled", "waiting", "definition_missing"),
        },
    )
    @_ops_action()
    def retry(self, request: Request, pk: str) -> Response:
        return self._operate(request, services.saga_retry_now, status.HTTP_202_ACCEPTED)

    @extend_schema(
        summary="Compensate (ops)",
        description="Stop a running saga and undo what it did; the reason goes to the "
        "timeline. `202`: the compensations run on a worker.",
        tags=["sagas"],
        request=CompensateSerializer,
        parameters=[SAGA_ID],
        responses={
            202: SagaSerializer,
            409: refused(
                "not_running",
                "already_cancelling",
                "already_compensating",
                "pivot_reached",
                "definition_missing",
            ),
        },
    )
    @_ops_action()
    def compensate(self, request: Request, pk: str) -> Response:
        return self._operate(
            request, services.saga_compensate, status.HTTP_202_ACCEPTED, CompensateSerializer
        )

    @extend_schema(
        summary="Resolve with a note (ops)",
        description="Close a saga in `needs_manual` by hand; the note goes to the timeline. "
        "`409` `effects_in_place` (naming them in `fields.accept_effects`) while steps that "
        "took effect were not undone, unless `accept_effects` is true. A resolved order holds "
        "no stock and reads `cancelled` (or `confirmed` when it stopped past its pivot).",
        tags=["sagas"],
        request=ResolveSerializer,
        parameters=[SAGA_ID],
        responses={
            200: SagaSerializer,
            409: refused(
                "not_needs_manual", "effects_in_place", "resolve_failed", "definition_missing"
            ),
        },
    )
    @_ops_action()
    def resolve(self, request: Request, pk: str) -> Response:
        return self._operate(request, services.saga_resolve, status.HTTP_200_OK, ResolveSerializer)

    @extend_schema(
        summary="Mark an undo done by hand (ops)",
        description="For a saga in `needs_manual` because the compensation of `step` keeps "
        "failing: record that a person did that undo by hand (the note says how) and go on "
        "with the rest of the compensation. The step's participant records the undo as done "
        "(an order's payment then reads the amount voided). `202`: a worker runs the remaining "
        "undos. `409` `not_waiting_on_undo` when the saga is not waiting on that undo, "
        "`undo_record_failed` when the participant could not record it (nothing changed).",
        tags=["sagas"],
        request=UndoDoneSerializer,
        parameters=[SAGA_ID],
        responses={
            202: SagaSerializer,
            409: refused("not_waiting_on_undo", "undo_record_failed", "definition_missing"),
        },
    )
    @_ops_action(url_path="undo-done")
    def undo_done(self, request: Request, pk: str) -> Response:
        return self._operate(
            request, services.saga_undo_done, status.HTTP_202_ACCEPTED, UndoDoneSerializer
        )

    @extend_schema(
        summary="Send a signal to a waiting saga",
        description="Ops staff; for a signal its saga type declares client-facing "
        "(`3ds_confirmed`) also the order's own client. `202` when the saga waits for it or "
        "will reach the wait (it is kept until then); the same `Idempotency-Key` again is a "
        "`202` replay with no second effect, or `422` with another payload; `409` when the "
        "saga can no longer take it.",
        tags=["sagas"],
        request=SignalInputSerializer,
        parameters=[SAGA_ID, SIGNAL_NAME, SIGNAL_KEY_PARAMETER],
        responses={
            202: SignalSerializer,
            400: ErrorSerializer,
            403: ErrorSerializer,
            409: SIGNAL_REFUSED,
            422: ErrorSerializer,
        },
    )
    @action(
        detail=True,
        methods=["post"],
        url_path=r"signals/(?P<name>[A-Za-z0-9_.:-]{1,64})",
        permission_classes=[permissions.IsAuthenticated],
        filter_backends=[],
    )
    def signal(self, request: Request, pk: str, name: str) -> Response:
        # Not get_object(): a client may send its own order's client-facing signals, and the
        # service decides who may send what (ops staff, or the client the signal is for).
        saga = generics.get_object_or_404(Saga.objects.all(), pk=pk)
        if not request.user.is_staff and not may_signal_saga(request.user, saga):
            # Before the body is read: a client learns nothing of another client's saga,
            # not even from a payload refused as malformed.
            raise NotFound()
        # Past that check a client is this saga's own: a signal that is not its to send (an
        # order's fraud_review) is the engine's 403 saying who may, as on the orders route.
        # Hiding the saga as a 404 told a client its own order did not exist.
        return send_signal(request, saga.pk, name)

    @extend_schema(
        summary="Compensation plan (dry run)",
        description="The compensations that compensating now would run, in order, with their "
        "idempotency keys. Changes nothing. A finished saga's plan is empty. `409 "
        "definition_missing` where this server does not register the definition of a saga "
        "that is not finished.",
        tags=["sagas"],
        parameters=[SAGA_ID],
        responses={200: CompensationPlanSerializer, 409: refused("definition_missing")},
    )
    @action(
        detail=True,
        methods=["get"],
        url_path="compensation-plan",
        filter_backends=[],
        pagination_class=None,
    )
    def compensation_plan(self, request: Request, pk: str) -> Response:
        saga = self.get_object()
        plan = services.saga_compensation_plan(saga_id=saga.pk)
        return Response(
            CompensationPlanSerializer(
                {"saga_id": saga.pk, "state": saga.state, "compensations": plan}
            ).data
        )
