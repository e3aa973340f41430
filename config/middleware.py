"""Request checks that hold for every route, before any view runs."""

from __future__ import annotations

from collections.abc import Callable

from django.core.exceptions import BadRequest
from django.http import HttpRequest, HttpResponse, QueryDict

from config.api_errors import handler400

_FORMS = ("application/x-www-form-urlencoded", "multipart/form-data")


class NulRefused(BadRequest):
    """Answered ``400``; its message names what held the NUL, and says nothing else, so the
    error handlers may show it (``public``)."""

    public = True


class RefuseNul:
    """A NUL character in the path, the query string, a cookie or a submitted form is a
    ``400``.

    PostgreSQL text cannot hold NUL, so a filter, a lookup by SKU, a session key (Django
    decodes octal escapes in quoted cookies: ``"abcdefgh\\000x"``), or a reason or note typed
    into the ops console carrying one would fail in the database with a 500; nothing in this
    product needs one. Django's form fields refuse NUL already, but the console's action
    pages read some fields straight from the form. API bodies are JSON, checked by the API's
    parser (which refuses form bodies), so their stream is left for it to read.
    """

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        refused = self.refusal(request)
        if refused is not None:
            # Answered here rather than raised: with DEBUG on, Django would answer a raised
            # BadRequest with its HTML debug page (a traceback and the settings) instead of the
            # 400 handler, so an API client of `make run` would get no JSON body.
            return handler400(request, refused)
        return self.get_response(request)

    @staticmethod
    def refusal(request: HttpRequest) -> NulRefused | None:
        if "\x00" in request.path or _holds_nul(request.GET):
            return NulRefused("A NUL character in the URL.")
        if any("\x00" in key or "\x00" in value for key, value in request.COOKIES.items()):
            return NulRefused("A NUL character in a cookie.")
        if (
            request.method == "POST"
            and request.content_type in _FORMS
            and not request.path_info.startswith("/api/")
            and _holds_nul(request.POST)
        ):
            return NulRefused("A NUL character in the form.")
        return None


def _holds_nul(data: QueryDict) -> bool:
    return any(
        "\x00" in key or any("\x00" in value for value in values) for key, values in data.lists()
    )
