"""Request checks that hold for every route, before any view runs."""

from __future__ import annotations

from collections.abc import Callable

from django.core.exceptions import BadRequest
from django.http import HttpRequest, HttpResponse, QueryDict

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
        if "\x00" in request.path or _holds_nul(request.GET):
            raise NulRefused("A NUL character in the URL.")
        if any("\x00" in key or "\x00" in value for key, value in request.COOKIES.items()):
            raise NulRefused("A NUL character in a cookie.")
        if (
            request.method == "POST"
            and request.content_type in _FORMS
            and not request.path_info.startswith("/api/")
            and _holds_nul(request.POST)
        ):
            raise NulRefused("A NUL character in the form.")
        return self.get_response(request)


def _holds_nul(data: QueryDict) -> bool:
    return any(
        "\x00" in key or any("\x00" in value for value in values) for key, values in data.lists()
    )
