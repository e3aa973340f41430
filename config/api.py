"""Shared pieces of the REST API: pagination, strict fields, closed bodies, the error schema.

Every app's API uses them the same way, so they import no app (``/metrics``, which reads the
engine's metrics, is ``config.metrics``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from rest_framework import exceptions, pagination, serializers
from rest_framework.exceptions import ErrorDetail
from rest_framework.request import Request

from config.errors import refused_fields
from config.text import trimmed

if TYPE_CHECKING:
    from django.contrib.auth.models import User


# ---------------------------------------------------------------------------------------------
# Pagination: page numbers, a bounded page size
# ---------------------------------------------------------------------------------------------
class Pagination(pagination.PageNumberPagination):
    """``?page=N&page_size=M``; ``page_size`` defaults to ``PAGE_SIZE`` and is capped at 100.

    A ``page`` or ``page_size`` that is not a positive integer is a ``400`` naming it (DRF
    answers ``page=abc`` with ``404`` and ignores ``page_size=abc``); a page past the last one
    is DRF's ``404``.
    """

    page_size_query_param = "page_size"
    max_page_size = 100

    def paginate_queryset(self, queryset: Any, request: Request, view: Any = None) -> Any:
        wrong = {
            name: ["A positive integer."]
            for name in (self.page_query_param, self.page_size_query_param)
            if name in request.query_params
            and not _positive_integer(request.query_params[name])
            and not (name == self.page_query_param and request.query_params[name] == "last")
        }
        if wrong:
            raise exceptions.ValidationError(wrong)
        return super().paginate_queryset(queryset, request, view)

    def get_schema_operation_parameters(self, view: Any) -> list[dict[str, Any]]:
        """The two parameters as this class takes them: DRF documents any integer, so a client
        generated from the schema (or a fuzzer) sends ``page=0`` and meets a ``400``."""
        page, size = super().get_schema_operation_parameters(view)
        page["description"] = "A page number (from 1), or `last`."
        page["schema"] = {
            "oneOf": [{"type": "integer", "minimum": 1}, {"type": "string", "enum": ["last"]}]
        }
        cap = self.max_page_size
        size["description"] = f"Results per page (from 1; more than {cap} gives {cap})."
        size["schema"] = {"type": "integer", "minimum": 1}
        return [page, size]


def _positive_integer(text: str) -> bool:
    # Digits only, not all zeros; never int(): a 5,000-digit page is past the end (404), not
    # a ValueError.
    return text.isascii() and text.isdigit() and text.strip("0") != ""


# ---------------------------------------------------------------------------------------------
# The signed-in user
# ---------------------------------------------------------------------------------------------
def signed_in_user(request: Request) -> User:
    """The user of a request that passed ``IsAuthenticated``.

    Views that scope rows to their owner call this instead of reading ``request.user``, which
    may be an ``AnonymousUser``: filtering by one would fail, so a request that got here
    without signing in answers 401 like any other.
    """
    user = request.user
    if not user.is_authenticated:
        raise exceptions.NotAuthenticated()
    return user


# ---------------------------------------------------------------------------------------------
# Strict input fields: JSON types as the schema says, no coercion
# ---------------------------------------------------------------------------------------------
class StrictCharField(serializers.CharField):
    """A string, and only a string (DRF's CharField also takes numbers)."""

    def to_internal_value(self, data: Any) -> str:
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


class WrittenCharField(StrictCharField):
    """A string someone must have written: blank also when all it holds is unseen (a
    zero-width space, a byte-order mark), which DRF's whitespace trimming leaves."""

    def to_internal_value(self, data: Any) -> str:
        value = trimmed(super().to_internal_value(data))
        if not value and not self.allow_blank:
            self.fail("blank")
        return value


class StrictIntegerField(serializers.IntegerField):
    """A JSON integer, and only that (DRF's IntegerField also takes "5", 5.0 and true)."""

    def to_internal_value(self, data: Any) -> int:
        if isinstance(data, bool) or not isinstance(data, int):
            self.fail("invalid")
        return super().to_internal_value(data)


class StrictDecimalField(serializers.DecimalField):
    """A decimal amount as JSON writes a number, or as a string of ASCII digits with an
    optional minus sign and decimals (``"12.50"``). DRF's DecimalField also took ``"１２"`` (any
    script's digits), ``"1_000"``, ``"1e5"``, surrounding spaces and ``true``; and it kept the
    sign of ``-0``, answering ``"-0.00"`` for what the database stores as ``0.00``."""

    _PLAIN = re.compile(r"-?[0-9]+(\.[0-9]+)?", re.ASCII)

    def to_internal_value(self, data: Any) -> Decimal:
        if isinstance(data, bool) or not isinstance(data, str | int | float):
            self.fail("invalid")
        if isinstance(data, str) and not self._PLAIN.fullmatch(data):
            self.fail("invalid")
        value = super().to_internal_value(data)
        return value.copy_abs() if value == 0 else value


class StrictBooleanField(serializers.BooleanField):
    """JSON ``true`` or ``false``, and only that. DRF's BooleanField also takes "yes", "on",
    "1" and 1: too loose for a field that confirms something that cannot be taken back."""

    def to_internal_value(self, data: Any) -> bool:
        if not isinstance(data, bool):
            self.fail("invalid", input=data)
        return data


class BoundedListField(serializers.ListField):
    """A list whose ``max_length`` is checked before its entries.

    DRF's ListField checks every entry first and its ``max_length`` only after, so a list far
    over the limit cost a check and an error per entry before the one error that mattered: a
    webhook registration with 140,000 unknown events took seconds of the web process and was
    answered with an 8 MB body of 140,000 errors. Over the limit, this is that one error and
    no entry is read, as an order's 100-line limit is checked before its lines.
    """

    def to_internal_value(self, data: Any) -> list:
        if isinstance(data, list) and self.max_length is not None and len(data) > self.max_length:
            self.fail("max_length", max_length=self.max_length)
        return super().to_internal_value(data)


# ---------------------------------------------------------------------------------------------
# Closed bodies: a name the body does not take is refused, not ignored
# ---------------------------------------------------------------------------------------------
class ClosedInput:
    # Put in front of an input serializer (``serializers.Serializer`` or ``ModelSerializer``):
    # a name of the body that none of its writable fields takes is refused, under its path,
    # beside the body's other problems.
    #
    # DRF drops such a name silently, so a client that sent a webhook ``secret`` of its own or
    # a product's new ``sku`` got a ``2xx`` and believed it took effect. A name of one of the
    # serializer's read-only fields, or of ``read_only_names`` (names the API answers with and
    # sets itself, each with its message or ``""``), is ``read_only_field``; any other is
    # ``unknown_field`` (``config.errors.refused_fields``); the error handler makes either the
    # error's code. Nested, each object is refused under its own path (``items[0].price``).
    #
    # (A comment, not a docstring: drf-spectacular would describe every body in the schema
    # with it.)

    #: Names the route answers with but sets itself: name -> why ("" for the usual message).
    read_only_names: Mapping[str, str] = {}
    #: The object as the message names it: "Unknown field: a product takes ...".
    input_name = "this body"

    def to_internal_value(self, data: Any) -> Any:
        try:
            value = super().to_internal_value(data)  # type: ignore[misc]
            errors: dict[str, Any] = {}
        except exceptions.ValidationError as exc:
            if not isinstance(exc.detail, Mapping):
                raise
            # Field names: str keys (the stubs type a detail's keys as str or int).
            value, errors = None, {str(k): v for k, v in exc.detail.items()}
        if isinstance(data, Mapping):
            fields = self.fields  # type: ignore[attr-defined]
            read_only = {name: "" for name, field in fields.items() if field.read_only}
            refused = refused_fields(
                data,
                takes=[name for name, field in fields.items() if not field.read_only],
                what=self.input_name,
                read_only={**read_only, **self.read_only_names},
            )
            if refused:
                named = {name: [ErrorDetail(why, code=code)] for name, code, why in refused}
                errors = {**named, **errors}
        if errors:
            raise exceptions.ValidationError(errors)
        return value


# ---------------------------------------------------------------------------------------------
# The error shape, for the schema
# ---------------------------------------------------------------------------------------------
class ErrorSerializer(serializers.Serializer):
    """Every 4xx (and 5xx) body of the API."""

    code = serializers.CharField(help_text="Machine-readable, e.g. `not_found`, `invalid`.")
    detail = serializers.CharField(help_text="What went wrong, for people.")
    # DRF's serializer metaclass moves declared fields out of the class, so this names the
    # body's "fields" key without replacing Serializer.fields; the stubs see an override.
    fields = serializers.DictField(  # type: ignore[assignment]
        child=serializers.ListField(child=serializers.CharField()),
        help_text="Messages by input path (`items[0].quantity`); empty when no field is to blame.",
    )


#: Error responses every operation may give, added to the schema by :func:`add_error_responses`.
COMMON_ERRORS: dict[str, str] = {
    "400": "Malformed request (bad JSON, wrong types, invalid values).",
    "401": "Missing or invalid credentials.",
    "403": "Authenticated, but not allowed.",
    "404": "No such resource (or not yours).",
    "405": "Method not allowed on this route.",
    "406": "Cannot render the requested media type.",
    "408": "The request body stopped arriving (no more of it for REQUEST_BODY_TIMEOUT seconds).",
    "413": "The request body is too large.",
    "415": "Unsupported media type (send application/json).",
    "429": "Throttled.",
}
_ANONYMOUS_OK = {"/api/schema/"}
_PLAIN_VIEWS = {"/healthz", "/metrics"}


def add_error_responses(result: dict, generator, request, public) -> dict:
    """drf-spectacular postprocessing hook: document the shared error responses on every
    operation (with the one error schema), so clients and schemathesis know every status the
    API may answer with."""
    components = result.setdefault("components", {}).setdefault("schemas", {})
    components.setdefault(
        "Error",
        {
            "type": "object",
            "description": ErrorSerializer.__doc__,
            "properties": {
                "code": {"type": "string"},
                "detail": {"type": "string"},
                "fields": {
                    "type": "object",
                    "additionalProperties": {"type": "array", "items": {"type": "string"}},
                },
            },
            "required": ["code", "detail", "fields"],
        },
    )
    ref = {"$ref": "#/components/schemas/Error"}
    for path, operations in result.get("paths", {}).items():
        if path in _PLAIN_VIEWS:
            continue
        for method, operation in operations.items():
            if method not in {"get", "post", "put", "patch", "delete"}:
                continue
            responses = operation.setdefault("responses", {})
            for code, description in COMMON_ERRORS.items():
                if path in _ANONYMOUS_OK and code in {"401", "403"}:
                    continue
                if code in responses:
                    continue
                responses[code] = {
                    "description": description,
                    "content": {"application/json": {"schema": ref}},
                }
    return result


def close_request_bodies(result: dict, generator, request, public) -> dict:
    """drf-spectacular postprocessing hook: every request body's object, and each object it
    holds by reference (an order's items and address), is ``additionalProperties: false``, as
    the API refuses any other name (``unknown_field``); a client generated from the schema (or
    a fuzzer) is not told that other names are taken. Free-form objects declared inline (a
    signal's ``payload``) stay open."""
    schemas = result.get("components", {}).get("schemas", {})
    seen: set[str] = set()

    def close(schema: dict) -> None:
        ref = schema.get("$ref", "")
        if ref.startswith("#/components/schemas/"):
            name = ref.rsplit("/", 1)[1]
            if name in seen or name not in schemas:
                return
            seen.add(name)
            schema = schemas[name]
        if schema.get("type") == "object" and "properties" in schema:
            schema["additionalProperties"] = False
        parts = [*schema.get("properties", {}).values(), schema.get("items")]
        parts += [*schema.get("allOf", []), *schema.get("oneOf", [])]
        for part in parts:
            if isinstance(part, dict):
                close(part)

    for operations in result.get("paths", {}).values():
        for operation in operations.values():
            if not isinstance(operation, dict):
                continue
            for content in operation.get("requestBody", {}).get("content", {}).values():
                close(content.get("schema", {}))
    return result


def add_plain_views(result: dict, generator, request, public) -> dict:
    """drf-spectacular postprocessing hook: ``/healthz`` and ``/metrics`` are plain Django views
    (no DRF), documented here so the schema lists every route the API documents."""
    paths = result.setdefault("paths", {})
    component = {
        "type": "object",
        "properties": {
            "status": {"type": "string", "enum": ["ok", "unavailable"]},
            "database": {"type": "string", "enum": ["ok", "unavailable", "timeout"]},
            "broker": {"type": "string", "enum": ["ok", "unavailable", "timeout"]},
            "down": {"type": "array", "items": {"type": "string"}},
        },
        "required": ["status", "database", "broker"],
    }
    result.setdefault("components", {}).setdefault("schemas", {})["Health"] = component
    health = {"application/json": {"schema": {"$ref": "#/components/schemas/Health"}}}
    paths["/healthz"] = {
        "get": {
            "operationId": "healthz",
            "summary": "Can this process reach the database and the broker?",
            "description": "For load balancers and orchestrators, without credentials: `200` "
            "while this web process reaches both the database and the broker, `503` naming "
            "the one it cannot reach (in `down`), so traffic goes to another process.",
            "tags": ["operations"],
            "security": [{}],
            "responses": {
                "200": {"description": "Both answer.", "content": health},
                "503": {
                    "description": "At least one does not (`down` names it).",
                    "content": health,
                },
            },
        }
    }
    paths["/metrics"] = {
        "get": {
            "operationId": "metrics",
            "summary": "Prometheus metrics (text exposition format)",
            "description": "For a Prometheus server to scrape, without credentials: how "
            "the engine's sagas, steps and providers are doing, as counters, gauges and "
            "histograms.",
            "tags": ["operations"],
            "security": [{}],
            "responses": {
                "200": {
                    "description": "Sagas started/finished by outcome, step latency, retries, "
                    "compensations, sagas per state.",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                }
            },
        }
    }
    return result


# ---------------------------------------------------------------------------------------------
# Every body read, even by actions that take none
# ---------------------------------------------------------------------------------------------
class BodyReadFirst:
    # Put in front of a view: its every ``POST`` (and ``PUT``, ``PATCH``, ``DELETE``) has its
    # body parsed once the caller is authenticated and allowed, before the action runs.
    #
    # DRF parses a body only when a view reads ``request.data``; an action that takes none (a
    # cancel, a retry) would otherwise carry out a request whose body is not JSON, or is too
    # big, and answer ``202``. Now such a body is the ``400 parse_error`` (``413``, ``415``) a
    # route that reads its body gives, and nothing is done. JSON that is not an object
    # (``[1]``, ``"x"``, ``null``) is ``400 invalid``, as a route with a serializer said
    # already: every such route takes an object or nothing.
    #
    # (A comment, not a docstring: drf-spectacular describes an operation whose view and
    # action have no docstring of their own with the first one up the view's MRO, and showed
    # this one to clients as what listing orders or deleting a webhook does.)

    #: Actions that refuse a body that is not an object themselves, in their own words.
    checks_own_body: tuple[str, ...] = ()
    #: Actions (or, on a plain view, methods: ``"delete"``) that take no field at all, each
    #: with its name for the message: a body that names one is refused as ``unknown_field``,
    #: not ignored (a cancel's ``reason`` would not be recorded anywhere).
    takes_no_fields: Mapping[str, str] = {}

    def initial(self, request: Request, *args: Any, **kwargs: Any) -> None:
        super().initial(request, *args, **kwargs)  # type: ignore[misc]
        if request.method not in ("POST", "PUT", "PATCH", "DELETE"):
            return
        data = request.data
        action = getattr(self, "action", None)
        if not isinstance(data, Mapping) and action not in self.checks_own_body:
            raise exceptions.ValidationError("The body must be a JSON object, or empty.")
        what = self.takes_no_fields.get(action or request.method.lower())
        if what is not None and isinstance(data, Mapping) and data:
            refused = refused_fields(data, takes=(), what=what)
            raise exceptions.ValidationError(
                {name: [ErrorDetail(why, code=code)] for name, code, why in refused}
            )
