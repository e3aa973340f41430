"""The engine's public surface: what another app needs to declare, start and operate sagas.

Import from here, not from the engine's rooms (``sagas.runner``, ``sagas.store``, ...): those
are free to move, this list is what the rest of the project may rely on. It imports models
(through the services), so import it after the apps are loaded (``AppConfig.ready`` or later),
never from a ``models`` module or an app's ``__init__``.

The database rows (``Saga``, ``SagaStep``, ``SagaEvent``) are read from ``sagas.models``;
``sagas.faults`` (fault points for tests and chaos runs), ``sagas.tracing`` and
``sagas.transactions`` (a participant's atomic block inside a transactional step) are their own
small surfaces.
"""

from sagas.definition import (
    JSON,
    BusinessFailure,
    ChangeHook,
    NothingHappened,
    ProviderAnswered,
    RetryPolicy,
    SagaDefinition,
    Sleep,
    Step,
    StepContext,
    Wait,
    forward_key,
    get_definition,
    register,
    registered_definitions,
    undo_key,
)
from sagas.exceptions import SagaOperationRefused, SignalPayloadInvalid
from sagas.services import (
    OPS_PERMISSION,
    saga_compensate,
    saga_compensation_plan,
    saga_data_flag,
    saga_definition_refusal,
    saga_effects_in_place,
    saga_refusal,
    saga_request_cancel,
    saga_resolve,
    saga_retry_now,
    saga_start,
    saga_stopped_before_pivot,
    saga_undo_done,
)
from sagas.signals import saga_signal

__all__ = [
    "JSON",
    "OPS_PERMISSION",
    "BusinessFailure",
    "NothingHappened",
    "ProviderAnswered",
    "ChangeHook",
    "RetryPolicy",
    "SagaDefinition",
    "SagaOperationRefused",
    "SignalPayloadInvalid",
    "Sleep",
    "Step",
    "StepContext",
    "Wait",
    "forward_key",
    "get_definition",
    "register",
    "registered_definitions",
    "saga_compensate",
    "saga_compensation_plan",
    "saga_data_flag",
    "saga_definition_refusal",
    "saga_effects_in_place",
    "saga_refusal",
    "saga_request_cancel",
    "saga_resolve",
    "saga_retry_now",
    "saga_signal",
    "saga_start",
    "saga_stopped_before_pivot",
    "saga_undo_done",
    "undo_key",
]
