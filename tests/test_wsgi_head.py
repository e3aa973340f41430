"""HEAD through the WSGI entry point gunicorn serves: a GET's headers, no body."""

from __future__ import annotations

import pytest
from django.test.client import RequestFactory

from config.wsgi import application

pytestmark = pytest.mark.django_db


def _call(method: str, path: str) -> tuple[str, dict[str, str], bytes]:
    seen: dict[str, object] = {}

    def start_response(status, headers, exc_info=None):
        seen["status"], seen["headers"] = status, dict(headers)

    environ = RequestFactory()._base_environ(PATH_INFO=path, REQUEST_METHOD=method)
    result = application(environ, start_response)
    try:
        body = b"".join(result)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    return seen["status"], seen["headers"], body  # type: ignore[return-value]


@pytest.mark.parametrize("path", ["/", "/api/v1/orders/"])
def test_head_gets_the_headers_of_a_get_and_no_body(path):
    get_status, get_headers, get_body = _call("GET", path)
    head_status, head_headers, head_body = _call("HEAD", path)
    assert get_body and head_body == b""
    assert head_status == get_status
    assert head_headers["Content-Type"] == get_headers["Content-Type"]
    assert head_headers["Content-Length"] == get_headers["Content-Length"] == str(len(get_body))
