"""Request checks that hold for every route, before any view runs."""

from __future__ import annotations

import contextlib
import heapq
import io
import itertools
import socket
import threading
import time
from collections.abc import Callable

import structlog
from django.conf import settings
from django.core.exceptions import (
    BadRequest,
    DisallowedHost,
    RequestDataTooBig,
    SuspiciousOperation,
    TooManyFieldsSent,
    TooManyFilesSent,
)
from django.core.handlers.wsgi import LimitedStream
from django.http import HttpRequest, HttpResponse, QueryDict

from config.api_errors import (
    MISSPELT_DETAIL,
    error_body,
    handler400,
    json_response,
    misspelt_api,
)

_FORMS = ("application/x-www-form-urlencoded", "multipart/form-data")

log = structlog.get_logger(__name__)


class RefuseUnknownHost:
    """A ``Host`` header not in ``ALLOWED_HOSTS`` is a ``400`` with the one error body, and
    one warning line.

    Left to Django, the first middleware that reads the host raises ``DisallowedHost``: with
    DEBUG on that is the HTML debug page (a traceback and the settings) instead of JSON, and
    either way an ``error`` with a full traceback in the log, so anyone could fill the log by
    sending made-up hosts. First in the chain, before anything reads the host.
    """

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        try:
            request.get_host()
        except DisallowedHost:
            log.warning(
                "http.host_refused",
                host=request.META.get("HTTP_HOST", "")[:200],
                hint="not in ALLOWED_HOSTS",
            )
            return handler400(request, HostRefused(HOST_REFUSED))
        return self.get_response(request)


#: What a request for a host name this site does not serve is told: which setting lists them,
#: not the name it sent or the names that are served.
HOST_REFUSED = (
    "This server does not answer to the host name in the request: it is not in the "
    "ALLOWED_HOSTS setting."
)


class HostRefused(BadRequest):
    """Answered ``400`` with :data:`HOST_REFUSED` (``public``: the handlers may show it)."""

    public = True


class MisspeltApiPath:
    """A path meant for the API but spelt otherwise (``//api/...``, ``/API/...``) is the JSON
    ``404`` whose detail says how routes are spelt, answered here, before the URLs are tried.

    Django's ``handler404`` says the same, but with ``DEBUG`` on (``make run``) Django answers
    a ``404`` with its own HTML page and never calls it. The body is not read for it.
    """

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        if misspelt_api(request.path_info):
            return json_response(error_body("not_found", MISSPELT_DETAIL), 404)
        return self.get_response(request)


class FramedBody:
    """Every request body is read here, whole and first, within ``REQUEST_BODY_TIMEOUT``; a
    body sent in chunks (``Transfer-Encoding: chunked``) is read like any other, and a
    compressed one (``Content-Encoding``, or a transfer coding besides ``chunked``) is a
    ``415``.

    A body that stops arriving (a ``Content-Length`` larger than what the client sends) held a
    gunicorn thread for as long as the client kept the connection open: a handful of such
    connections took every thread of a web process, ``/healthz`` included. Here the whole body
    must arrive within ``REQUEST_BODY_TIMEOUT`` seconds of its first read (one deadline, so a
    client trickling a byte now and then cannot stretch it); then the request is a ``408`` and
    its thread is free (gunicorn closes a connection whose body it failed to read: where the next
    request would start is unknown).
    A body cut short by the client (its connection closed or reset before the
    ``Content-Length`` was reached) is a ``400``, not a shorter body taken at its word, and so
    is a chunked body whose framing is broken (gunicorn's parse error was a ``500``). Either
    way no view runs, so nothing is done. Read whole because a
    deadline only holds where the reading is: views and forms read the body in many places,
    and an error there was a ``500``. A ``Content-Length`` over ``DATA_UPLOAD_MAX_MEMORY_SIZE``
    is refused (``413``) before any of it is read, as Django's own reading of it does.

    Django's WSGI request reads a body up to its ``Content-Length`` and takes a missing one
    for an empty body. A chunked body has none, so it vanished: a chunked order was refused as
    having no items, and a chunked cancel whose body was not JSON was carried out, since its
    body read as empty. Here the server's decoded stream is read (gunicorn sets
    ``wsgi.input_terminated``: its stream ends where the body does), at most
    ``DATA_UPLOAD_MAX_MEMORY_SIZE`` (``413`` beyond; that counts the whole body, file parts
    too, which no route here takes), and handed on with its length; a WSGI server that cannot
    say where the body ends (Django's ``runserver``) gets ``411``, answered before anything is
    done. Under ASGI the server has read the body before Django sees the request (a chunked
    one too): left alone. A compressed body is refused rather than misread: the API's parser
    would take gzip for broken UTF-8, and any other coding for what it is not (gunicorn takes
    ``gzip, chunked`` off the chunks and hands on the gzip). Before every other middleware
    that reads the body (the CSRF check, the NUL check of forms).
    """

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        meta = request.META
        chunked = "HTTP_TRANSFER_ENCODING" in meta and not meta.get("CONTENT_LENGTH")
        has_body = chunked or meta.get("CONTENT_LENGTH") not in (None, "", "0")
        compressed = _compression(meta)
        if compressed and has_body:
            return _refused(
                415,
                "unsupported_media_type",
                f"A compressed body ({compressed[:60]}) is not accepted; send it uncompressed.",
            )
        if has_body and "wsgi.input" in meta and not _anonymous_api_call(request):
            refused = _read_chunked(request) if chunked else _read_sized(request)
            if refused is not None:
                return refused
        return self.get_response(request)


def _anonymous_api_call(request: HttpRequest) -> bool:
    """An API call with no credentials at all (no ``Authorization`` header, no session): it
    is answered ``401`` without its body, so the body is not read for it either. Read first,
    it let anyone hold a thread for ``REQUEST_BODY_TIMEOUT`` per connection before being told
    to sign in; unread, gunicorn drains it after the answer within its own short limit. (A
    request with made-up credentials is read, within the deadline, and then refused.)"""
    return (
        request.path_info.startswith("/api/")
        and not request.META.get("HTTP_AUTHORIZATION")
        and settings.SESSION_COOKIE_NAME not in request.COOKIES
    )


def _read_chunked(request: HttpRequest) -> HttpResponse | None:
    """Read a chunked body into the request, with the length it turned out to have; the
    answer refusing it instead, if any."""
    meta = request.META
    if not meta.get("wsgi.input_terminated"):
        return _refused(
            411,
            "length_required",
            "This server cannot read a body without a Content-Length; send one.",
        )
    limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    try:
        body = _read_within(meta, None if limit is None else limit + 1)
    except OSError as exc:  # gunicorn's own stream: a timeout, a reset
        return _unreadable(request, exc)
    except _MALFORMED as exc:  # the chunks' own framing is broken
        return _malformed(request, exc)
    if limit is not None and len(body) > limit:
        return _refused(413, "payload_too_large", "The request body is too large.")
    _hand_on(request, body)
    return None


def _read_sized(request: HttpRequest) -> HttpResponse | None:
    """Read a body of a stated ``Content-Length`` into the request (every later reader is
    given it from memory); the answer refusing it instead, if any."""
    try:
        length = int(request.META["CONTENT_LENGTH"])
    except ValueError:
        return None  # gunicorn refuses such a header; another server: Django reads no body
    limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    if limit is not None and length > limit:
        return _refused(413, "payload_too_large", "The request body is too large.")
    try:
        body = _read_within(request.META, length)
    except OSError as exc:
        return _unreadable(request, exc)
    if len(body) < length:
        log.warning(
            "http.body_incomplete",
            method=request.method,
            path=request.path[:200],
            content_length=length,
            received=len(body),
        )
        return _refused(
            400,
            "bad_request",
            f"The request body ended after {len(body)} of the {length} bytes its "
            "Content-Length announced; send the whole body.",
        )
    _hand_on(request, body[:length])
    return None


class _BodyDeadlines:
    """Cuts off request bodies still being read at their deadline: one thread per process.

    A socket timeout bounds each read, not the whole body: a client sending a byte now and
    then, each within it, would hold its thread as long as it liked (gunicorn's stream reads
    on until it has what was asked for). At a body's deadline this thread shuts the reading
    side of its connection down, which ends the read at once, as if the client had stopped
    (the answer can still be written); :meth:`disarm` says whether that happened.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._due: list[tuple[float, int]] = []
        self._armed: dict[int, socket.socket] = {}
        self._cut: set[int] = set()
        self._tokens = itertools.count()
        self._thread: threading.Thread | None = None

    def arm(self, sock: socket.socket, deadline: float) -> int:
        with self._cond:
            if self._thread is None or not self._thread.is_alive():  # none yet, or forked
                self._thread = threading.Thread(
                    target=self._run, name="request-body-deadlines", daemon=True
                )
                self._thread.start()
            token = next(self._tokens)
            heapq.heappush(self._due, (deadline, token))
            self._armed[token] = sock
            self._cond.notify()
            return token

    def disarm(self, token: int) -> bool:
        """Stop watching; whether the deadline had passed and the read was cut off."""
        with self._cond:
            self._armed.pop(token, None)
            if token in self._cut:
                self._cut.discard(token)
                return True
            return False

    def _run(self) -> None:
        with self._cond:
            while True:
                now = time.monotonic()
                while self._due and self._due[0][0] <= now:
                    _, token = heapq.heappop(self._due)
                    sock = self._armed.pop(token, None)
                    if sock is not None:  # still being read: cut it off
                        self._cut.add(token)
                        with contextlib.suppress(OSError):
                            # The plain socket's own shutdown: an SSLSocket's would drop its
                            # TLS state, and the answer would then go out in the clear.
                            socket.socket.shutdown(sock, socket.SHUT_RD)
                self._cond.wait(self._due[0][0] - now if self._due else None)


_DEADLINES = _BodyDeadlines()


class _BodyTimedOut(TimeoutError):
    """The whole body did not arrive within ``REQUEST_BODY_TIMEOUT``."""


def _read_within(meta: dict, most: int | None) -> bytes:
    """Up to ``most`` bytes of the body (all of it if ``None``), the whole of it arriving
    within ``REQUEST_BODY_TIMEOUT`` seconds: else :class:`_BodyTimedOut`.

    One deadline for the whole body (:class:`_BodyDeadlines`), read before the request is
    authenticated, so an anonymous client cannot hold a thread past it either. Only where the
    server hands over its socket (gunicorn's ``"gunicorn.socket"``); other servers' reads are
    not bounded here.
    """
    stream = meta["wsgi.input"]
    sock = meta.get("gunicorn.socket")
    token = None
    if sock is not None:
        token = _DEADLINES.arm(sock, time.monotonic() + settings.REQUEST_BODY_TIMEOUT)
    cut = False
    try:
        body = stream.read() if most is None else stream.read(most)
    except _CUT_SHORT:
        cut = token is not None and _DEADLINES.disarm(token)
        token = None
        if not cut:
            raise
        body = b""
    finally:
        if token is not None:
            cut = _DEADLINES.disarm(token)
    if cut:
        raise _BodyTimedOut("the request body did not arrive in time")
    return body


def _hand_on(request: HttpRequest, body: bytes) -> None:
    """The body as every later reader gets it: from memory, with its length."""
    request.META["CONTENT_LENGTH"] = str(len(body))
    # What WSGIRequest builds from a Content-Length (built from none for a chunked body).
    request._stream = LimitedStream(io.BytesIO(body), len(body))  # type: ignore[assignment]


def _malformed_errors() -> tuple[type[BaseException], ...]:
    """gunicorn's errors for a body whose chunked framing is broken (a chunk size that is not
    hexadecimal, a missing terminator): not ``OSError``s, and a ``500`` with a traceback
    unless caught. Empty where gunicorn is not installed."""
    try:
        from gunicorn.http.errors import ParseException
    except ImportError:  # pragma: no cover - gunicorn is a dependency
        return ()
    return (ParseException,)


_MALFORMED = _malformed_errors()
#: What a read that the deadline cut off may raise: the connection ended mid-body.
_CUT_SHORT: tuple[type[BaseException], ...] = (OSError, *_MALFORMED)


def _malformed(request: HttpRequest, exc: BaseException) -> HttpResponse:
    log.warning(
        "http.body_malformed",
        method=request.method,
        path=request.path[:200],
        error=f"{type(exc).__name__}: {exc}"[:200],
    )
    return _refused(
        400,
        "bad_request",
        "The request body's chunked framing is broken; send it as HTTP/1.1 chunks, or with a "
        "Content-Length.",
    )


def _unreadable(request: HttpRequest, exc: OSError) -> HttpResponse:
    """``408`` for a body that stopped arriving, ``400`` for a connection that failed while it
    was sent (answered in case the client still reads, and so that it is not a ``500``)."""
    fields = {
        "method": request.method,
        "path": request.path[:200],
        "content_length": request.META.get("CONTENT_LENGTH") or "chunked",
    }
    if _timed_out(exc):
        timeout = settings.REQUEST_BODY_TIMEOUT
        log.warning("http.body_timed_out", waited=timeout, **fields)
        return _refused(
            408,
            "request_timeout",
            f"The request body did not arrive in time: all of it must come within {timeout:g} "
            "seconds. Send the whole body without pausing, and no Content-Length larger than "
            "it.",
        )
    log.warning("http.body_unreadable", error=str(exc)[:200], **fields)
    return _refused(
        400,
        "bad_request",
        "The request body could not be read: the connection failed while it was sent.",
    )


def _timed_out(exc: BaseException) -> bool:
    """Whether the read ended for want of time: the body's deadline (:class:`_BodyTimedOut`)
    or the socket's own timeout, both ``TimeoutError``s (the stream is read directly here, so
    nothing wraps them)."""
    return isinstance(exc, TimeoutError)


def _compression(meta: dict) -> str | None:
    """The header that says the body is compressed, as ``Name: value``; ``None`` if none."""
    transfer = meta.get("HTTP_TRANSFER_ENCODING", "").strip().lower()
    if transfer not in ("", "chunked"):
        return f"Transfer-Encoding: {transfer}"
    content = meta.get("HTTP_CONTENT_ENCODING", "").strip().lower()
    if content not in ("", "identity"):
        return f"Content-Encoding: {content}"
    return None


def _refused(status: int, code: str, detail: str) -> HttpResponse:
    return json_response(error_body(code, detail), status)


class NulRefused(BadRequest):
    """Answered ``400``; its message names what held the NUL, and says nothing else, so the
    error handlers may show it (``public``)."""

    public = True


class FieldsRefused(BadRequest):
    """Answered ``400``; its message says what was too much, nothing the client did not send."""

    public = True


def _too_much(exc: SuspiciousOperation) -> str:
    limits = settings.DATA_UPLOAD_MAX_NUMBER_FIELDS, settings.DATA_UPLOAD_MAX_NUMBER_FILES
    if isinstance(exc, TooManyFieldsSent):
        return f"Too many query parameters or form fields: at most {limits[0]}."
    if isinstance(exc, TooManyFilesSent):
        return f"Too many files in the form: at most {limits[1]}."
    if isinstance(exc, RequestDataTooBig):
        return "The form is too large."
    return "Bad request."


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
        refused: BadRequest | None
        try:
            refused = self.refusal(request)
        except SuspiciousOperation as exc:
            # Reading the query string or the form found more fields than Django reads
            # (DATA_UPLOAD_MAX_NUMBER_FIELDS) or a form too large: answered here too, as a
            # JSON 400 for the API. Raised on, it was Django's 400 in production, but under
            # DEBUG its debug page read request.GET again, raised again and ended in a 500.
            refused = FieldsRefused(_too_much(exc))
            log.warning("http.fields_refused", path=request.path[:200], problem=str(refused))
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
