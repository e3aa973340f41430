"""A request body that stops arriving is answered ``408`` once ``REQUEST_BODY_TIMEOUT`` has
passed and its thread is free again; one cut short is a ``400``. Nothing is done for either.

A ``Content-Length`` larger than the body sent held a gunicorn thread for as long as the client
kept the connection open (a tester's curl: 11 minutes, until killed), and a few such
connections took every thread, ``/healthz`` included (``config.middleware.FramedBody``). The
in-process tests hand the view what gunicorn hands it, a stream read from a socket and the
socket, from a real socket pair; the last test stalls real connections to gunicorn.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import uuid
from collections.abc import Iterator

import pytest
import requests
from django.db import connection
from django.test import override_settings
from drf_spectacular.generators import SchemaGenerator

from orders.models import Order
from tests.conftest import database_url_for

from .conftest import api_client_for, assert_error, gunicorn_web, order_body

ORDERS = "/api/v1/orders/"

#: How long the server's socket waits on its own, before the fix's bound: without the fix an
#: in-process test waits this long and fails, instead of hanging.
UNBOUNDED = 20.0


@pytest.fixture
def socket_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """The server's and the client's ends of one connection."""
    server, client = socket.socketpair()
    server.settimeout(UNBOUNDED)
    with server, client:
        yield server, client


def _post_over(api, server: socket.socket, content_length: int):
    """``POST /orders/`` as gunicorn hands it on: a stream read from the connection, and the
    connection's socket."""
    environ = {"wsgi.input": server.makefile("rb"), "gunicorn.socket": server}
    return api.generic(
        "POST", ORDERS, b"", "application/json", CONTENT_LENGTH=str(content_length), **environ
    )


@override_settings(REQUEST_BODY_TIMEOUT=0.5)
def test_a_body_that_stops_arriving_is_408_and_nothing_is_done(client_api, catalog, socket_pair):
    server, client = socket_pair
    body = json.dumps(order_body()).encode()
    client.sendall(body[:20])  # and then nothing, the connection left open

    response = _post_over(client_api, server, len(body))

    detail = assert_error(response, 408, "request_timeout")["detail"]
    assert detail.startswith("The request body did not arrive in time"), detail
    assert "0.5 seconds" in detail, detail
    assert server.gettimeout() == UNBOUNDED  # given back: the answer is written as before
    assert not Order.objects.exists()


@override_settings(REQUEST_BODY_TIMEOUT=1.0)
def test_a_body_trickling_in_is_408_once_its_whole_time_is_up(client_api, catalog):
    """One deadline for the whole body: a client sending a byte now and then, each within the
    timeout, could otherwise hold the thread for as long as it liked (before it is even
    authenticated). The client here sends a byte every 0.2 s from a thread, for far longer
    than the second allowed; the request is answered 408 before the body is complete."""
    import threading

    server, client = socket.socketpair()
    server.settimeout(UNBOUNDED)
    body = json.dumps(order_body()).encode()
    stop = threading.Event()

    def trickle() -> None:
        for byte in body:
            if stop.wait(0.2):  # the client's own pace, not a wait for the server
                return
            try:
                client.sendall(bytes([byte]))
            except OSError:
                return

    sender = threading.Thread(target=trickle, daemon=True)
    sender.start()
    try:
        response = _post_over(client_api, server, len(body))
    finally:
        stop.set()
        sender.join(10)
        server.close()
        client.close()
    assert_error(response, 408, "request_timeout")
    assert not Order.objects.exists()


def test_a_chunked_body_with_broken_framing_is_400_not_a_500(client_api, catalog, socket_pair):
    """A chunk size that is not hexadecimal: gunicorn's parser raises an error of its own (no
    OSError), which was a 500 with a traceback, for anyone to cause."""
    from gunicorn.http.body import Body, ChunkedReader
    from gunicorn.http.unreader import SocketUnreader

    server, client = socket_pair
    client.sendall(b"zz\r\n{}\r\n0\r\n\r\n")

    class Req:  # what gunicorn's ChunkedReader asks of its request
        trailers: list = []

        class cfg:  # noqa: N801 - gunicorn's own attribute
            max_chunk_size = 0

    stream = Body(ChunkedReader(Req(), SocketUnreader(server)))
    environ = {
        "wsgi.input": stream,
        "wsgi.input_terminated": True,
        "gunicorn.socket": server,
        "HTTP_TRANSFER_ENCODING": "chunked",
    }
    response = client_api.generic(
        "POST", ORDERS, b"", "application/json", CONTENT_LENGTH="", **environ
    )
    detail = assert_error(response, 400, "bad_request")["detail"]
    assert "chunked framing is broken" in detail, detail
    assert not Order.objects.exists()


@override_settings(REQUEST_BODY_TIMEOUT=60.0)
def test_an_anonymous_api_call_is_401_without_its_body_being_read(db, anon_api, socket_pair):
    """No credentials at all: the 401 comes at once, the stalled body unread (gunicorn drains
    what is left within its own limit). Read first, it held the thread until the deadline (here
    the socket's own 20 s, ending in a 408) before the caller was told to sign in."""
    server, client = socket_pair
    body = json.dumps(order_body()).encode()
    client.sendall(body[:20])  # and then nothing

    response = _post_over(anon_api, server, len(body))

    assert_error(response, 401, "not_authenticated")
    assert not Order.objects.exists()


def test_a_body_cut_short_is_400_not_taken_at_its_word(client_api, catalog, socket_pair):
    """A whole order, but a Content-Length 8 bytes longer, and the client closes its side: the
    order is not placed from what arrived."""
    server, client = socket_pair
    body = json.dumps(order_body()).encode()
    client.sendall(body)
    client.shutdown(socket.SHUT_WR)

    response = _post_over(client_api, server, len(body) + 8)

    detail = assert_error(response, 400, "bad_request")["detail"]
    assert f"ended after {len(body)} of the {len(body) + 8} bytes" in detail, detail
    assert not Order.objects.exists()


@override_settings(DATA_UPLOAD_MAX_MEMORY_SIZE=1000, REQUEST_BODY_TIMEOUT=0.5)
def test_a_content_length_over_the_limit_is_413_before_any_of_it_is_read(client_api, socket_pair):
    """Reading every body first reads none over the limit (as before): nothing of it is sent
    here, and reading any would wait, and end in a 408."""
    server, _ = socket_pair
    response = _post_over(client_api, server, 1001)
    assert_error(response, 413, "payload_too_large")


def test_the_schema_lists_the_408_on_every_operation():
    schema = SchemaGenerator().get_schema(request=None, public=True)
    operations = [
        (f"{method.upper()} {path}", operation)
        for path, item in schema["paths"].items()
        if path.startswith("/api/")
        for method, operation in item.items()
        if method in {"get", "post", "put", "patch", "delete"}
    ]
    assert operations
    assert [name for name, operation in operations if "408" not in operation["responses"]] == []


def _answer(conn: socket.socket) -> tuple[int, dict, bool]:
    """The status and JSON body of the answer on ``conn``, and whether the server closed the
    connection after it."""
    response = http.client.HTTPResponse(conn)
    response.begin()
    body = json.loads(response.read())
    return response.status, body, conn.recv(1) == b""


@pytest.mark.django_db(transaction=True)
def test_gunicorn_answers_stalled_bodies_408_and_keeps_serving(tmp_path, django_user_model):
    """Served as ``make run`` serves (gthread), by one worker of two threads: three orders
    whose body stops arriving (two with a Content-Length, one in chunks) take both threads and
    queue a third; ``/healthz``, queued behind them, is answered while their clients still hold
    the connections open, and each is answered ``408`` once ``REQUEST_BODY_TIMEOUT`` (1 s here)
    has passed, its connection closed. Before, none was ever answered, nor was ``/healthz``."""
    env = {
        **os.environ,
        "DATABASE_URL": database_url_for(connection.settings_dict),
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path),
        "REQUEST_BODY_TIMEOUT": "1",
    }
    env.pop("TEST_DATABASE_NAME", None)
    buyer = django_user_model.objects.create_user(f"buyer-{uuid.uuid4().hex[:6]}")
    body = json.dumps(order_body()).encode()
    head = (
        f"POST {ORDERS} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Token {api_client_for(buyer).token}\r\n"
        "Content-Type: application/json\r\n"
    ).encode()
    sized = head + f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:20]
    chunked = head + f"Transfer-Encoding: chunked\r\n\r\n{len(body):x}\r\n".encode() + body[:20]
    threads = ["--worker-class", "gthread", "--workers", "1", "--threads", "2"]

    with gunicorn_web(env, tmp_path, threads) as url:
        port = int(url.rsplit(":", 1)[1])
        stalled: list[socket.socket] = []
        try:
            for raw in (sized, sized, chunked):
                conn = socket.create_connection(("127.0.0.1", port), timeout=60)
                stalled.append(conn)
                conn.sendall(raw)  # and then nothing, the connection left open

            health = requests.get(f"{url}/healthz", timeout=60)
            assert health.status_code == 200, health.text

            for conn in stalled:
                status, answer, closed = _answer(conn)
                assert (status, answer["code"]) == (408, "request_timeout"), answer
                assert set(answer) == {"code", "detail", "fields"}, answer
                assert closed
        finally:
            for conn in stalled:
                conn.close()
    assert not Order.objects.filter(owner=buyer).exists()
