"""gunicorn's own answers, in the API's error shape.

gunicorn refuses some requests before Django sees them: a control character in a header, a
request line or headers over its limits, a malformed chunk. Its answer was a small HTML page,
the one place a client of this API met an error that is not ``{"code", "detail", "fields"}``
JSON. :func:`install` (called from ``gunicorn.conf.py`` as the server starts, before the
workers fork) makes gunicorn write the same status with a JSON body instead, for every path:
gunicorn cannot always tell which path a request it could not read was for.
"""

from __future__ import annotations

import json
import socket

from gunicorn import util

#: The ``code`` of each status gunicorn answers with itself.
CODES = {
    400: "bad_request",
    403: "permission_denied",
    414: "uri_too_long",
    417: "expectation_failed",
    431: "request_header_fields_too_large",
    500: "server_error",
    501: "not_implemented",
}
#: At most this much of gunicorn's message (which may quote what the client sent) is kept.
DETAIL_MAX = 300


def write_error(sock: socket.socket, status_int: int, reason: str, mesg: str) -> None:
    """gunicorn's ``util.write_error``, with a JSON body."""
    detail = f"{reason}: {mesg}" if mesg else f"{reason}."
    body = json.dumps(
        {"code": CODES.get(status_int, "bad_request"), "detail": detail[:DETAIL_MAX], "fields": {}},
        separators=(",", ":"),  # as DRF writes JSON (config.api_errors.COMPACT_JSON)
        ensure_ascii=False,
    ).encode()
    head = (
        f"HTTP/1.1 {status_int} {reason}\r\n"
        "Connection: close\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    util.write_nonblock(sock, head.encode("latin-1") + body)


def install() -> None:
    """Make gunicorn answer with :func:`write_error` (its workers look it up per error)."""
    util.write_error = write_error
