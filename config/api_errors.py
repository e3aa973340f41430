"""One JSON shape for every error of the REST API: ``{"code", "detail", "fields"}``.

``code`` is machine-readable (``not_found``, ``invalid``, ``pivot_reached``, ...), ``detail``
is for people, ``fields`` maps each offending input path (``items[1].quantity``,
``shipping_address.country``) to its messages and is ``{}`` when no field is to blame.

:func:`exception_handler` is DRF's ``EXCEPTION_HANDLER``: it covers everything DRF raises
(validation, parse errors, authentication, permissions, 404s, 405s, throttling, ...) plus every
:class:`config.errors.AppError` the apps raise (each says its own status), so views never build
error responses by hand and this module knows no app. The
``handler*`` functions give the same shape to the few errors Django answers before any view
runs (a bad ``Host`` header, an unmatched URL under ``/api/`` when not routed), and
:func:`unrouted_api_path` to a path under ``/api/`` no route takes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.core.exceptions import RequestDataTooBig
from django.core.exceptions import ValidationError as DjangoValidationError
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.views import defaults
from django.views.decorators.csrf import csrf_exempt
from rest_framework import exceptions, status
from rest_framework.authentication import BaseAuthentication
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.settings import api_settings
from rest_framework.views import exception_handler as drf_exception_handler
from rest_framework.views import set_rollback

from config.api_parsers import PayloadTooLarge
from config.errors import READ_ONLY_FIELD, UNKNOWN_FIELD, AppError


class ApiError(exceptions.APIException):
    """An API error with a specific code and optional field errors.

    Subclass it with ``status_code``, ``default_code`` and ``default_detail``, or raise it
    directly: ``ApiError("Say why.", code="reason_required", status_code=400)``.
    """

    status_code: int = status.HTTP_400_BAD_REQUEST  # an instance may carry another
    default_code = "invalid"
    default_detail = "The request is not valid."

    def __init__(
        self,
        detail: str | None = None,
        *,
        code: str | None = None,
        fields: dict[str, list[str]] | None = None,
        status_code: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail, code)
        self.code = code or self.default_code
        self.fields = fields or {}
        self.headers = headers or {}
        if status_code is not None:
            self.status_code = status_code


def error_body(code: str, detail: str, fields: dict[str, list[str]] | None = None) -> dict:
    return {"code": code, "detail": detail, "fields": fields or {}}


#: How DRF's renderer writes JSON (no spaces, UTF-8 as is): every answer outside DRF (Django's
#: own errors, the middleware's refusals, gunicorn's, /healthz) is written the same way, so one
#: error reads byte for byte alike whichever layer gave it (a 413 was two shapes, by whether
#: the body came chunked).
COMPACT_JSON = {"separators": (",", ":"), "ensure_ascii": False}


def json_response(body: Any, status: int) -> JsonResponse:
    """``JsonResponse`` written as DRF writes JSON (:data:`COMPACT_JSON`), U+2028 and U+2029
    escaped as DRF escapes them (JavaScript took them for line ends)."""
    response = JsonResponse(body, status=status, json_dumps_params=COMPACT_JSON)
    if b"\xe2\x80\xa8" in response.content or b"\xe2\x80\xa9" in response.content:
        response.content = response.content.replace("\u2028".encode(), b"\\u2028").replace(
            "\u2029".encode(), b"\\u2029"
        )
    return response


def flatten_errors(detail: Any, prefix: str = "") -> dict[str, list[str]]:
    """DRF's nested error structure as ``{"items[0].quantity": ["..."]}``.

    Errors that belong to no field (``non_field_errors``) are listed under the path of the
    object they belong to, or ``non_field_errors`` at the top.
    """
    out: dict[str, list[str]] = {}
    if isinstance(detail, dict):
        for key, value in detail.items():
            if key in ("non_field_errors", api_settings.NON_FIELD_ERRORS_KEY):
                path = prefix or "non_field_errors"
            elif isinstance(key, int):
                path = f"{prefix}[{key}]"
            else:
                path = f"{prefix}.{key}" if prefix else str(key)
            for p, messages in flatten_errors(value, path).items():
                out.setdefault(p, []).extend(messages)
    elif isinstance(detail, list | tuple):
        if all(not isinstance(item, dict | list | tuple) for item in detail):
            if detail:
                out.setdefault(prefix or "non_field_errors", []).extend(str(m) for m in detail)
        else:
            for i, item in enumerate(detail):
                for p, messages in flatten_errors(item, f"{prefix}[{i}]").items():
                    out.setdefault(p, []).extend(messages)
    elif detail is not None and str(detail):
        out.setdefault(prefix or "non_field_errors", []).append(str(detail))
    return out


def summarize(fields: dict[str, list[str]]) -> str:
    """ "items[0].quantity: Ensure this value is ... (and 2 more)"."""
    if not fields:
        return "The request is not valid."
    path, messages = next(iter(fields.items()))
    count = sum(len(m) for m in fields.values())
    text = messages[0] if path == "non_field_errors" else f"{path}: {messages[0]}"
    return text + (f" (and {count - 1} more)" if count > 1 else "")


def _code_of(exc: exceptions.APIException) -> str:
    code = getattr(exc, "code", None)
    if isinstance(code, str) and code:
        return code
    codes = exc.get_codes()
    if isinstance(codes, str):
        return codes
    return exc.default_code


def _refused_name_code(codes: Any) -> str | None:
    """The first ``unknown_field`` or ``read_only_field`` among a validation error's codes (in
    the order of its fields), if any: a name the body may not carry is what the client most
    needs told, and these come first (``config.api.ClosedInput``)."""
    if isinstance(codes, dict):
        codes = list(codes.values())
    if isinstance(codes, list | tuple):
        for item in codes:
            found = _refused_name_code(item)
            if found:
                return found
        return None
    return codes if codes in (UNKNOWN_FIELD, READ_ONLY_FIELD) else None


def exception_handler(exc: Exception, context: dict) -> Response | None:
    """DRF ``EXCEPTION_HANDLER``: every handled error as ``{"code", "detail", "fields"}``."""
    if isinstance(exc, AppError):
        set_rollback()
        answer = Response(
            error_body(exc.code, exc.detail, exc.fields), status=exc.status_for_client()
        )
        for name, value in exc.headers.items():
            answer[name] = value
        return answer
    if isinstance(exc, DjangoValidationError):
        # A model or field validator that ran outside a serializer (e.g. a malformed UUID).
        exc = exceptions.ValidationError(
            exc.message_dict if hasattr(exc, "error_dict") else exc.messages
        )
    if isinstance(exc, RequestDataTooBig):
        exc = PayloadTooLarge()
    elif isinstance(exc, Http404):
        exc = exceptions.NotFound()
    elif isinstance(exc, DjangoPermissionDenied):
        exc = exceptions.PermissionDenied(str(exc) or None)

    elif isinstance(exc, exceptions.NotAuthenticated):
        _explain_not_authenticated(exc, context)

    response = drf_exception_handler(exc, context)
    if response is None:
        return None  # a bug: Django's 500 handling (and its logging) takes over

    assert isinstance(exc, exceptions.APIException)
    detail = exc.detail
    if isinstance(detail, dict | list):
        fields = flatten_errors(detail)
        code = _code_of(exc)
        if isinstance(exc, exceptions.ValidationError):
            code = _refused_name_code(exc.get_codes()) or code
        body = error_body(code, summarize(fields), fields)
    else:
        body = error_body(_code_of(exc), str(detail), getattr(exc, "fields", None))
    response.data = body
    for name, value in getattr(exc, "headers", {}).items():
        response[name] = value
    return response


def _explain_not_authenticated(exc: exceptions.NotAuthenticated, context: dict) -> None:
    """A ``401`` for a request that sent credentials no authentication class takes says so.

    DRF's "Authentication credentials were not provided." is told to a client that sent
    ``Authorization: Bearer <its valid token>``; an authentication class that can tell what
    was wrong says it through ``not_authenticated_detail(request)`` (the token class, for a
    scheme other than its own), and the first answer replaces DRF's words. The code stays
    ``not_authenticated``, and the exception keeps the ``WWW-Authenticate`` challenge DRF set
    on it."""
    request = context.get("request")
    for authenticator in getattr(request, "authenticators", None) or ():
        explain = getattr(authenticator, "not_authenticated_detail", None)
        detail = explain(request) if explain is not None else None
        if detail:
            exc.detail = exceptions.ErrorDetail(detail, code=exc.default_code)
            return


# ---------------------------------------------------------------------------------------------
# Errors Django answers itself (before or outside DRF views): JSON under /api/, HTML elsewhere.
# ---------------------------------------------------------------------------------------------
def _wants_json(request: HttpRequest) -> bool:
    """Under ``/api/``, or a path a client meant for it: ``//api/...`` (a base
    URL ending in a slash joined to a path starting with one), ``/API/...``. An API client
    reads the one JSON error shape, never an HTML page."""
    return request.path.startswith("/api/") or misspelt_api(request.path)


def misspelt_api(path: str) -> bool:
    """Not under ``/api/``, yet meant for the API (see :func:`_wants_json`)."""
    return path.lstrip("/").lower().split("/", 1)[0] == "api" and not path.startswith("/api/")


#: The 404 of a misspelt API path: routes are case-sensitive, and Django does not merge slashes.
MISSPELT_DETAIL = (
    "No API route matches this path: routes are lower-case, under one leading /api/, and end "
    "with a slash (e.g. /api/v1/orders/)."
)


def handler400(request: HttpRequest, exception: Exception) -> HttpResponse:
    if _wants_json(request):
        # Django's own 400s (a bad Host header, a suspicious operation) may quote what the
        # client sent: only an exception marked ``public`` says more than "Bad request.".
        detail = str(exception) if getattr(exception, "public", False) else "Bad request."
        return json_response(error_body("bad_request", detail), 400)
    return defaults.bad_request(request, exception)


def handler403(request: HttpRequest, exception: Exception) -> HttpResponse:
    if _wants_json(request):
        detail = str(exception) if exception and str(exception) else "Permission denied."
        return json_response(error_body("permission_denied", detail), 403)
    return defaults.permission_denied(request, exception)


def handler404(request: HttpRequest, exception: Exception) -> HttpResponse:
    if _wants_json(request):
        return json_response(error_body("not_found", "Not found."), 404)
    return defaults.page_not_found(request, exception)


#: The catch-all's answer: every route ends with a slash, the commonest miss.
UNROUTED_DETAIL = "No API route matches this path (routes end with a slash, e.g. /api/v1/orders/)."
#: Its answer to a path that does end with one: the routes are listed in the API's docs.
UNROUTED_WITH_SLASH = "No API route matches this path; the routes are listed at /api/docs/."


def unrouted_detail(path: str) -> str:
    """What the catch-all says of ``path``: the slash advice only to a path without one."""
    return UNROUTED_WITH_SLASH if path.endswith("/") else UNROUTED_DETAIL


@csrf_exempt
def unrouted_api_path(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
    """Anything under ``/api/`` that no route matches (a missing trailing slash too), any
    method: ``404 not_found`` in the one error shape, not Django's HTML page, nor a redirect to
    the path with a slash (which would lose a ``POST``'s body).

    It counts against the caller's rate limit like any route, or a scanner could request made-up
    paths without end: the API's authentication classes run, as they charge the limits, and a
    request over its limit is the API's ``429``. Who it is changes nothing else: a wrong token
    is charged to its address and still told the path does not exist.

    A plain Django view, not a DRF one: the browsable API's breadcrumbs resolve every prefix
    of the page's path (``/api/v1/orders``, ``/api/v1``) and list each DRF view they meet, so
    a DRF catch-all put a "Not Found" crumb before every real page's."""
    classes: list[type[BaseAuthentication]] = api_settings.DEFAULT_AUTHENTICATION_CLASSES  # type: ignore[assignment]
    authenticators = [auth() for auth in classes]
    try:
        Request(request, authenticators=authenticators).user  # noqa: B018 - authenticates
    except exceptions.Throttled as exc:
        return _plain_response(exception_handler(exc, {"request": request}))
    except exceptions.APIException:
        # A wrong token (charged to its address), or a session's write without its CSRF
        # token (refused before it is charged, as on every route): still no such path.
        pass
    return json_response(error_body("not_found", unrouted_detail(request.path)), 404)


def _plain_response(answer: Response | None) -> HttpResponse:
    """A DRF error answer from :func:`exception_handler` as a response no DRF view renders."""
    assert answer is not None
    response = json_response(answer.data, answer.status_code)
    for name, value in answer.items():
        if name.lower() != "content-type":
            response[name] = value
    return response


def handler500(request: HttpRequest) -> HttpResponse:
    if _wants_json(request):
        return json_response(
            error_body("server_error", "Something went wrong on our side; it has been logged."),
            500,
        )
    return defaults.server_error(request)


def read_only_endpoint(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    """For a plain Django view that machines read (``/healthz``, ``/metrics``): any method but
    ``GET`` and ``HEAD`` is ``405`` in the one JSON error shape, with ``Allow``.

    Without it a ``POST`` met Django's CSRF check first and got the CSRF failure page, HTML,
    from an endpoint nobody can hold a CSRF token for; nothing here changes state, so nothing
    is lost by exempting it.
    """

    @csrf_exempt
    @functools.wraps(view)
    def wrapped(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if request.method not in ("GET", "HEAD"):
            response = json_response(error_body("method_not_allowed", "Use GET."), 405)
            response["Allow"] = "GET, HEAD"
            return response
        return view(request, *args, **kwargs)

    return wrapped
