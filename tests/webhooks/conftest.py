"""A real HTTP receiver on 127.0.0.1 for the webhook tests, and helpers around it."""

from __future__ import annotations

import json
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from tests.api.conftest import api_client_for, make_product, order_body  # noqa: F401


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    status: int

    @property
    def event(self) -> dict[str, Any]:
        return json.loads(self.body)


@dataclass
class Receiver:
    """Records every POST; ``answer(n, body)`` gives the status of the n-th (0-based), and may
    block (a hung receiver) until the test lets it go; ``None`` hangs up without an answer
    (the request read in full first)."""

    server: ThreadingHTTPServer
    requests: list[Received] = field(default_factory=list)
    answer: Callable[[int, bytes], int | None] = lambda n, body: 200
    reply: bytes = b"thanks " * 200  # longer than the stored excerpt
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}/hooks?client=1"

    def accepted(self) -> list[dict[str, Any]]:
        """Events the receiver answered 2xx, in arrival order."""
        with self.lock:
            return [r.event for r in self.requests if 200 <= r.status < 300]

    def all(self) -> list[Received]:
        with self.lock:
            return list(self.requests)


def _start_receiver(
    tls: ssl.SSLContext | None = None, address: tuple[str, int] = ("127.0.0.1", 0)
) -> Receiver:
    """``tls``: serve https with this server-side context (its certificate and key loaded);
    ``address``: where to listen (any free port of 127.0.0.1 by default)."""
    holder: dict[str, Receiver] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the http.server API
            receiver = holder["r"]
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            with receiver.lock:
                n = sum(1 for _ in receiver.requests)
                slot = Received(dict(self.headers.items()), body, 0)
                receiver.requests.append(slot)
            status = receiver.answer(n, body)
            if status is None:
                self.close_connection = True
                return
            slot.status = status
            try:
                self.send_response(status)
                self.send_header("Content-Type", "text/plain")
                self.end_headers()
                self.wfile.write(receiver.reply)
            except OSError:
                pass  # the sender gave up (timeout, killed worker)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(address, Handler)
    server.daemon_threads = True
    if tls is not None:
        # Before serving: the handshake then happens on accept (a client that refuses the
        # certificate never gets as far as a request).
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    holder["r"] = Receiver(server)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return holder["r"]


@pytest.fixture
def receiver_factory() -> Iterator[Callable[[], Receiver]]:
    started: list[Receiver] = []

    def start(
        tls: ssl.SSLContext | None = None, address: tuple[str, int] = ("127.0.0.1", 0)
    ) -> Receiver:
        r = _start_receiver(tls, address)
        started.append(r)
        return r

    yield start
    for r in started:
        r.server.shutdown()
        r.server.server_close()


@pytest.fixture
def receiver(receiver_factory) -> Receiver:
    return receiver_factory()


@pytest.fixture
def customer(django_user_model):
    return django_user_model.objects.create_user("ada", email="ada@example.com")


@pytest.fixture
def other_customer(django_user_model):
    return django_user_model.objects.create_user("grace", email="grace@example.com")


@pytest.fixture
def catalog(db) -> None:
    make_product("lamp", price="19.90", stock=10_000)
    make_product("mug", price="12.00", stock=10_000)


def register(client, url: str, events: list[str] | None = None) -> dict[str, Any]:
    events = events or ["order.updated", "order.confirmed", "order.cancelled"]
    events = [*events, "order.needs_attention"] if "order.needs_attention" not in events else events
    response = client.post("/api/v1/webhooks/", {"url": url, "events": events}, format="json")
    assert response.status_code == 201, response.content
    return response.json()


def place(client, **kwargs: Any) -> dict[str, Any]:
    response = client.post("/api/v1/orders/", order_body(**kwargs), format="json")
    assert response.status_code == 201, response.content
    return response.json()


@pytest.fixture(autouse=True)
def _no_delivery_in_flight_at_teardown(request, wait_for) -> Iterator[None]:
    """A worker still recording an attempt would hold row locks while the test database is
    flushed; wait for in-flight attempts to finish first."""
    yield
    if "transactional_db" not in request.fixturenames:
        return
    from django.utils import timezone

    from webhooks.models import Delivery, DeliveryStatus

    wait_for(
        lambda: (
            not Delivery.objects.filter(
                status=DeliveryStatus.PENDING, lease_until__gt=timezone.now()
            ).exists()
        ),
        timeout=60,
    )
