"""One endpoint's attempts, made in this process against a real HTTP receiver on 127.0.0.1:
the address check at delivery time (a DNS change, a rebinding resolver), https with the
certificate verified, backoff then dead, both secrets during a rotation's grace, and the
verification example of docs/webhooks.md.

The deliveries run here (``deliver_endpoint``, the body of the ``webhooks.deliver`` task) so a
test can change what a host name resolves to between registration and delivery; the tests
with worker processes are in ``test_delivery.py``.
"""

from __future__ import annotations

import re
import socket
import ssl
import threading
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
import trustme
from django.utils import timezone
from structlog.testing import capture_logs

from webhooks import delivery as webhook_delivery
from webhooks import signing
from webhooks.delivery import deliver_endpoint, forget_tls_context
from webhooks.models import Delivery, DeliveryStatus
from webhooks.services import event_emit

from .conftest import api_client_for, register

pytestmark = pytest.mark.django_db

HOST = "hooks.shop.example"
PUBLIC = "93.184.215.14"
_real_getaddrinfo = socket.getaddrinfo


@pytest.fixture
def resolver(monkeypatch):
    """``resolver.answers``: what ``HOST`` resolves to, one entry per lookup (the last one
    repeats), an address or a tuple of addresses in the order the resolver gives them; other
    names resolve as usual. ``resolver.lookups`` counts lookups of HOST."""

    class Resolver:
        answers: list[str | tuple[str, ...]] = [PUBLIC]
        lookups = 0

    def getaddrinfo(host, port, *args, **kwargs):
        if host != HOST:
            return _real_getaddrinfo(host, port, *args, **kwargs)
        answer = Resolver.answers[min(Resolver.lookups, len(Resolver.answers) - 1)]
        Resolver.lookups += 1
        addresses = (answer,) if isinstance(answer, str) else answer
        return [
            (socket.AF_INET6, socket.SOCK_STREAM, 6, "", (a, int(port or 0), 0, 0))
            if ":" in a
            else (socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, int(port or 0)))
            for a in addresses
        ]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return Resolver


def _emit(customer) -> str:
    event = event_emit(
        owner_id=customer.pk, subject=uuid.uuid4(), type="order.confirmed", data={"id": "x"}
    )
    assert event is not None
    return str(event.id)


def test_a_host_that_now_resolves_to_loopback_is_refused_at_delivery(
    customer, receiver, resolver, settings
):
    """Registered while its name resolved to a public address; by delivery time the DNS record
    points at 127.0.0.1 (where the receiver listens). The attempt is refused before any
    connection, and recorded as such."""
    settings.WEBHOOKS_ALLOW_PRIVATE = False
    port = receiver.server.server_address[1]
    endpoint = register(api_client_for(customer), f"https://{HOST}:{port}/hooks")
    _emit(customer)

    resolver.answers = ["127.0.0.1"]
    assert deliver_endpoint(endpoint["id"]) == 1

    delivery = Delivery.objects.get(endpoint_id=endpoint["id"])
    assert delivery.last_error.startswith("refused:"), delivery.last_error
    assert "127.0.0.1" in delivery.last_error
    assert delivery.status == DeliveryStatus.PENDING and delivery.last_status_code is None
    assert receiver.all() == []


def test_a_delivery_connects_to_the_address_it_checked(customer, receiver, resolver, settings):
    """A rebinding resolver: the name's first answer is the receiver's address, every later
    one an address nobody listens on. The attempt resolves once, checks that address and
    connects to it, presenting the name in ``Host``."""
    settings.WEBHOOKS_ALLOW_PRIVATE = True
    port = receiver.server.server_address[1]
    endpoint = register(api_client_for(customer), f"http://{HOST}:{port}/hooks")
    event_id = _emit(customer)

    resolver.lookups = 0
    resolver.answers = ["127.0.0.1", "127.0.0.2"]
    assert deliver_endpoint(endpoint["id"]) == 1

    [request] = receiver.all()
    assert request.event["id"] == event_id
    assert request.headers["Host"] == f"{HOST}:{port}"
    assert Delivery.objects.get(endpoint_id=endpoint["id"]).status == DeliveryStatus.DELIVERED
    assert resolver.lookups == 1


@pytest.mark.parametrize(
    ("scheme", "down"),
    [
        ("http", "127.0.0.2"),  # several A records, one of them down
        ("http", "::1"),  # dual stack, IPv6 refused (or not there at all)
        ("https", "127.0.0.2"),
    ],
)
def test_a_host_whose_first_address_refuses_is_delivered_to_at_its_next(
    customer, receiver_factory, resolver, settings, monkeypatch, tmp_path, scheme, down
):
    """A host with two addresses: the first refuses the connection, the second is the
    receiver (listening on 127.0.0.1 only). The attempt goes on to the second once the first
    could not be connected to, and delivers, from the one lookup that checked both; over https
    it presents the host's name, not an address, in the handshake. The log says which address
    refused."""
    settings.WEBHOOKS_ALLOW_PRIVATE = True
    server_names: list[str] = []
    tls = None
    if scheme == "https":
        ca = trustme.CA()
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(HOST).configure_cert(tls)
        tls.sni_callback = lambda sock, name, context: server_names.append(name)
        bundle = tmp_path / "ca.pem"
        ca.cert_pem.write_to_path(str(bundle))
        monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    forget_tls_context()
    receiver = receiver_factory(tls=tls)
    port = receiver.server.server_address[1]
    endpoint = register(api_client_for(customer), f"{scheme}://{HOST}:{port}/hooks")
    event_id = _emit(customer)

    resolver.lookups = 0
    resolver.answers = [(down, "127.0.0.1")]
    with capture_logs() as logs:
        assert deliver_endpoint(endpoint["id"]) == 1
    forget_tls_context()  # the next test's attempts trust the system's roots again

    delivery = Delivery.objects.get(endpoint_id=endpoint["id"])
    assert (delivery.status, delivery.attempts) == (DeliveryStatus.DELIVERED, 1), (
        delivery.last_error
    )
    [request] = receiver.all()
    assert request.event["id"] == event_id
    assert request.headers["Host"] == f"{HOST}:{port}"
    assert server_names == ([HOST] if scheme == "https" else [])
    assert resolver.lookups == 1
    [failed] = [line for line in logs if line["event"] == "webhooks.connect_failed"]
    assert (failed["address"], failed["next_address"]) == (down, "127.0.0.1")
    if down == "127.0.0.2":
        assert failed["error"] == "Connection refused"


def test_when_no_address_takes_the_connection_it_is_one_failed_attempt_naming_each(
    customer, receiver, resolver, settings
):
    """Every address of the host refuses: one failed attempt, retried after its backoff like
    any other, whose error (read by staff in the ops console; the client API shows no delivery
    errors) names each address tried and what it did."""
    settings.WEBHOOKS_ALLOW_PRIVATE = True
    port = receiver.server.server_address[1]  # nothing listens on it at 127.0.0.2 and .3
    endpoint = register(api_client_for(customer), f"http://{HOST}:{port}/hooks")
    _emit(customer)

    resolver.answers = [("127.0.0.2", "127.0.0.3")]
    assert deliver_endpoint(endpoint["id"]) == 1

    delivery = Delivery.objects.get(endpoint_id=endpoint["id"])
    _pending_with_backoff(delivery, "NoAddressAccepted: ")
    assert delivery.last_error == (
        f"NoAddressAccepted: no address of {HOST} accepted a connection on port {port}: "
        "127.0.0.2 (Connection refused), 127.0.0.3 (Connection refused)"
    )
    assert receiver.all() == []


def test_an_address_that_took_the_connection_is_kept_to_even_when_the_exchange_fails(
    customer, receiver_factory, resolver, settings
):
    """The first address takes the connection and the request, then hangs up without an
    answer: it may have the event, so the attempt does not go on to the second address (its
    receiver would take it at once). It is one failed attempt; its retry, once the first
    address refuses connections, brings the same event to the second."""
    settings.WEBHOOKS_ALLOW_PRIVATE = True
    second = receiver_factory()
    port = second.server.server_address[1]
    first = receiver_factory(address=("127.0.0.2", port))
    first.answer = lambda n, body: None  # reads the whole request, closes without answering
    endpoint = register(api_client_for(customer), f"http://{HOST}:{port}/hooks")
    event_id = _emit(customer)

    resolver.answers = [("127.0.0.2", "127.0.0.1")]
    assert deliver_endpoint(endpoint["id"]) == 1
    delivery = Delivery.objects.get(endpoint_id=endpoint["id"])
    _pending_with_backoff(delivery, "ProtocolError: ")
    assert "Remote end closed connection without response" in delivery.last_error
    assert [request.event["id"] for request in first.all()] == [event_id]
    assert second.all() == []

    first.server.shutdown()
    first.server.server_close()  # 127.0.0.2 refuses connections from now on
    Delivery.objects.filter(pk=delivery.pk).update(next_attempt_at=timezone.now())
    assert deliver_endpoint(endpoint["id"]) == 1
    delivery.refresh_from_db()
    assert (delivery.status, delivery.attempts) == (DeliveryStatus.DELIVERED, 2)
    assert [event["id"] for event in second.accepted()] == [event_id]


def test_the_addresses_share_the_attempts_time(customer, receiver, resolver, settings, monkeypatch):
    """Each address may take WEBHOOKS_CONNECT_TIMEOUT to fail (one that drops packets), so
    trying the next must not carry the attempt past its lease: an address gets what is left of
    the attempt's time if that is less, and none is tried once it is up. The attempt's clock
    stands still here and jumps while the first address refuses, as if that had taken so
    long: to all but half a second of the attempt's 13 s (the next address gets that half
    second, and delivers), then to all of it (the next is not tried; the error says so)."""
    settings.WEBHOOKS_ALLOW_PRIVATE = True
    settings.WEBHOOKS_CONNECT_TIMEOUT, settings.WEBHOOKS_TIMEOUT = 3.0, 10.0
    port = receiver.server.server_address[1]
    endpoint = register(api_client_for(customer), f"http://{HOST}:{port}/hooks")
    resolver.answers = [("127.0.0.2", "127.0.0.1")]
    clock, jump = [1000.0], [0.0]
    real_connect, timeouts = webhook_delivery._connect, []

    def connect(address, port, timeout, options):
        timeouts.append((address, timeout))
        try:
            return real_connect(address, port, timeout, options)
        finally:
            if address == "127.0.0.2":
                clock[0] += jump[0]

    monkeypatch.setattr(webhook_delivery, "_monotonic", lambda: clock[0])
    monkeypatch.setattr(webhook_delivery, "_connect", connect)

    jump[0] = 12.5
    first = _emit(customer)
    assert deliver_endpoint(endpoint["id"]) == 1
    assert Delivery.objects.get(event_id=first).status == DeliveryStatus.DELIVERED
    assert timeouts == [("127.0.0.2", 3.0), ("127.0.0.1", 0.5)]

    jump[0], timeouts[:] = 13.0, []
    late = _emit(customer)
    assert deliver_endpoint(endpoint["id"]) == 1
    delivery = Delivery.objects.get(event_id=late)
    _pending_with_backoff(delivery, "NoAddressAccepted: ")
    assert delivery.last_error.endswith(
        "127.0.0.2 (Connection refused), "
        "and the attempt's 13 s were up before 127.0.0.1 could be tried"
    )
    assert timeouts == [("127.0.0.2", 3.0)]
    assert [event["id"] for event in receiver.accepted()] == [first]


def test_https_verifies_the_certificate_and_attempts_share_one_tls_context(
    customer, receiver_factory, resolver, settings, monkeypatch, tmp_path
):
    """An https endpoint whose certificate a private CA issued for its host name. While the
    worker does not trust that CA the attempt fails in the handshake: nothing reaches the
    receiver, the error is recorded and the delivery waits for its retry. Once the worker's
    ``SSL_CERT_FILE`` names the CA, the pending event and two more arrive over https, and
    those attempts (one thread) built one TLS context between them, not one each."""
    settings.WEBHOOKS_ALLOW_PRIVATE = True
    ca = trustme.CA()
    server_side = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(HOST).configure_cert(server_side)
    receiver = receiver_factory(tls=server_side)
    resolver.answers = ["127.0.0.1"]
    port = receiver.server.server_address[1]
    endpoint = register(api_client_for(customer), f"https://{HOST}:{port}/hooks")

    forget_tls_context()
    first = _emit(customer)
    assert deliver_endpoint(endpoint["id"]) == 1
    delivery = Delivery.objects.get(endpoint_id=endpoint["id"])
    assert "CERTIFICATE_VERIFY_FAILED" in delivery.last_error, delivery.last_error
    assert delivery.status == DeliveryStatus.PENDING and delivery.last_status_code is None
    assert receiver.all() == []

    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    forget_tls_context()
    built = []
    real = webhook_delivery._new_tls_context
    monkeypatch.setattr(webhook_delivery, "_new_tls_context", lambda: built.append(1) or real())
    Delivery.objects.update(next_attempt_at=timezone.now())
    later = [_emit(customer), _emit(customer)]
    assert deliver_endpoint(endpoint["id"]) == 3
    assert [event["id"] for event in receiver.accepted()] == [first, *later]
    assert set(Delivery.objects.values_list("status", flat=True)) == {DeliveryStatus.DELIVERED}
    assert len(built) == 1
    forget_tls_context()  # the next test's attempts trust the system's roots again


def test_an_internationalised_host_is_resolved_verified_and_named_in_its_ascii_form(
    customer, receiver_factory, settings, monkeypatch, tmp_path
):
    """``https://bücher.shop.example/``: certificates carry the IDNA form of the name, so the
    lookup, the TLS server name, the certificate check and ``Host`` all use
    ``xn--bcher-kva.shop.example``, and the event arrives."""
    unicode_host, ascii_host = "bücher.shop.example", "xn--bcher-kva.shop.example"
    settings.WEBHOOKS_ALLOW_PRIVATE = True
    ca = trustme.CA()
    server_side = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(ascii_host).configure_cert(server_side)
    server_names: list[str] = []
    server_side.sni_callback = lambda sock, name, context: server_names.append(name)
    receiver = receiver_factory(tls=server_side)
    port = receiver.server.server_address[1]
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    forget_tls_context()

    looked_up: list[str] = []

    def getaddrinfo(host, port, *args, **kwargs):
        if host not in (unicode_host, ascii_host):  # a resolver answers either spelling
            return _real_getaddrinfo(host, port, *args, **kwargs)
        looked_up.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", int(port)))]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    endpoint = register(api_client_for(customer), f"https://{unicode_host}:{port}/hooks")
    event_id = _emit(customer)
    assert deliver_endpoint(endpoint["id"]) == 1

    delivery = Delivery.objects.get(endpoint_id=endpoint["id"])
    assert delivery.status == DeliveryStatus.DELIVERED, delivery.last_error
    [request] = receiver.all()
    assert request.event["id"] == event_id
    assert request.headers["Host"] == f"{ascii_host}:{port}"
    assert server_names == [ascii_host]
    assert set(looked_up) == {ascii_host}
    forget_tls_context()  # the next test's attempts trust the system's roots again


def test_failures_back_off_with_jitter_and_the_delivery_dies_when_its_window_ends(
    customer, receiver, settings
):
    settings.WEBHOOKS_BACKOFF_BASE = 100.0
    settings.WEBHOOKS_BACKOFF_MAX = 150.0
    settings.WEBHOOKS_RESPONSE_EXCERPT = 10
    receiver.answer = lambda n, body: 500
    endpoint = register(api_client_for(customer), receiver.url)
    _emit(customer)
    delivery = Delivery.objects.get(endpoint_id=endpoint["id"])
    delays = []
    for attempt in (1, 2, 3):
        assert deliver_endpoint(endpoint["id"]) == 1
        delivery.refresh_from_db()
        assert (delivery.status, delivery.attempts) == (DeliveryStatus.PENDING, attempt)
        assert (delivery.last_status_code, delivery.last_error) == (500, "HTTP 500")
        assert delivery.response_excerpt == "thanks tha"  # the first bytes only
        delays.append((delivery.next_attempt_at - delivery.last_attempt_at).total_seconds())
        assert deliver_endpoint(endpoint["id"]) == 0  # not due yet
        Delivery.objects.filter(pk=delivery.pk).update(next_attempt_at=timezone.now())
    # min(max, base * 2**(n-1)) times a jitter in [0.5, 1]: 100, 200 -> 150, 400 -> 150.
    assert 50 <= delays[0] <= 100.5 and 75 <= delays[1] <= 150.5 and 75 <= delays[2] <= 150.5

    # The next failure would be retried after the delivery's window: it is dead instead.
    Delivery.objects.filter(pk=delivery.pk).update(
        retry_until=timezone.now() + timedelta(seconds=1)
    )
    assert deliver_endpoint(endpoint["id"]) == 1
    delivery.refresh_from_db()
    assert (delivery.status, delivery.attempts) == (DeliveryStatus.DEAD, 4)
    assert deliver_endpoint(endpoint["id"]) == 0
    assert len(receiver.all()) == 4


def test_a_reply_with_bytes_text_cannot_hold_is_recorded_not_a_500(customer, receiver):
    """The receiver's reply is kept as an excerpt in a text column: a NUL or invalid UTF-8 in
    it becomes U+FFFD instead of failing the attempt's record."""
    receiver.reply = b"ok\x00\xff done"
    endpoint = register(api_client_for(customer), receiver.url)
    _emit(customer)
    assert deliver_endpoint(endpoint["id"]) == 1
    delivery = Delivery.objects.get(endpoint_id=endpoint["id"])
    assert (delivery.status, delivery.last_status_code) == (DeliveryStatus.DELIVERED, 200)
    assert delivery.response_excerpt == "ok\ufffd\ufffd done"


def test_during_a_rotation_a_delivery_verifies_with_either_secret(customer, receiver):
    client = api_client_for(customer)
    endpoint = register(client, receiver.url)
    new = client.post(f"/api/v1/webhooks/{endpoint['id']}/rotate-secret/").json()["secret"]
    _emit(customer)
    assert deliver_endpoint(endpoint["id"]) == 1

    [request] = receiver.all()
    header = request.headers[signing.HEADER]
    assert header.count("v1=") == 2
    assert signing.verify(new, header, request.body)
    assert signing.verify(endpoint["secret"], header, request.body)
    assert not signing.verify("whsec_other", header, request.body)


def _documented_verify():
    """The ``verify`` function of docs/webhooks.md, as a receiver copies it."""
    page = (Path(__file__).resolve().parents[2] / "docs" / "webhooks.md").read_text()
    code = re.search(r"```python\n(.*?)```", page, re.S)
    assert code is not None, "docs/webhooks.md has no python example"
    assert len(code.group(1).strip().splitlines()) <= 12
    namespace: dict = {}
    exec(compile(code.group(1), "docs/webhooks.md", "exec"), namespace)  # noqa: S102 - our docs
    return namespace["verify"]


def test_the_documented_example_verifies_a_real_delivery(customer, receiver):
    verify = _documented_verify()
    client = api_client_for(customer)
    endpoint = register(client, receiver.url)
    _emit(customer)
    assert deliver_endpoint(endpoint["id"]) == 1
    [request] = receiver.all()
    header = request.headers[signing.HEADER]

    assert verify(endpoint["secret"], header, request.body)
    assert not verify(endpoint["secret"], header, request.body + b" ")
    assert not verify("whsec_other", header, request.body)
    sent_at = int(header.split(",")[0].removeprefix("t="))
    old = signing.sign([endpoint["secret"]], request.body, timestamp=sent_at - 3600)
    assert not verify(endpoint["secret"], old, request.body)


#: What the trickling receiver sends first: an HTTP status line and the start of a header, or
#: (for https) the header of a TLS handshake record of 16 KiB, whose bytes then come one by one.
PRELUDES = {"http": b"HTTP/1.1 200 OK\r\nX-Slow: ", "https": b"\x16\x03\x03\x40\x00"}


def _trickling_receiver(stop: threading.Event, prelude: bytes = PRELUDES["http"]) -> int:
    """A port that answers every request with ``prelude``, then one byte every 0.2 s until
    ``stop``: never silent for as long as a read timeout, never done."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.2)

    def serve(conn: socket.socket) -> None:
        with conn:
            conn.recv(65536)
            conn.sendall(prelude)
            while not stop.wait(0.2):
                try:
                    conn.sendall(b"x")
                except OSError:
                    return

    def accept() -> None:
        with listener:
            while not stop.is_set():
                try:
                    conn, _ = listener.accept()
                except TimeoutError:
                    continue
                threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return listener.getsockname()[1]


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_an_answer_that_trickles_in_is_cut_off_at_connect_plus_read_timeout(
    customer, settings, scheme
):
    """Each read's timeout alone would let an endpoint that sends a byte at a time hold the
    attempt past its delivery's lease (and the sweeper would start a second attempt beside
    it): the attempt ends, as a timeout, at WEBHOOKS_CONNECT_TIMEOUT + WEBHOOKS_TIMEOUT. When
    what trickles in is the TLS handshake (https), before any HTTP is exchanged, it ends at
    WEBHOOKS_CONNECT_TIMEOUT: Python's ssl bounds the whole handshake by the socket's timeout
    (urllib3 names it a read timeout)."""
    settings.WEBHOOKS_CONNECT_TIMEOUT, settings.WEBHOOKS_TIMEOUT = 1.0, 1.5
    stop = threading.Event()
    # Without the cut-off the attempt would go on until the receiver stops, a minute on.
    threading.Timer(60, stop.set).start()
    try:
        port = _trickling_receiver(stop, PRELUDES[scheme])
        url = f"{scheme}://127.0.0.1:{port}/hooks"
        endpoint = register(api_client_for(customer), url)
        _emit(customer)
        assert deliver_endpoint(endpoint["id"]) == 1
        assert not stop.is_set()  # cut off, not finished by the receiver
    finally:
        stop.set()
    delivery = Delivery.objects.get(endpoint_id=endpoint["id"])
    assert delivery.status == DeliveryStatus.PENDING  # to be retried after its backoff
    assert delivery.last_status_code is None
    if scheme == "http":
        assert delivery.last_error == "AttemptTimedOut: no complete answer within 2.5 s"
    else:  # the connect timeout, not the read timeout
        assert delivery.last_error.startswith("ReadTimeoutError: "), delivery.last_error
        assert delivery.last_error.endswith("Read timed out. (read timeout=1.0)")


def _pending_with_backoff(delivery: Delivery, error_start: str) -> None:
    """Recorded as a failed attempt: its error, no lease, the next attempt a backoff later."""
    delivery.refresh_from_db()
    assert (delivery.status, delivery.attempts) == (DeliveryStatus.PENDING, 1)
    assert delivery.last_error.startswith(error_start), delivery.last_error
    assert delivery.lease_until is None and delivery.last_status_code is None
    assert delivery.next_attempt_at > delivery.last_attempt_at


def test_an_attempt_that_raises_something_unexpected_fails_and_the_next_delivery_goes_out(
    customer, receiver, monkeypatch, settings
):
    """The first event's POST raises what no handler expects (here the UnicodeEncodeError
    http.client raises for a Host it cannot write in Latin-1). That attempt is a failure like
    any other, recorded with its error and backed off, and the endpoint's next delivery is sent
    by the same task: the failed one is not claimed again at once, ahead of it, forever."""
    settings.WEBHOOKS_BACKOFF_BASE = 100.0
    endpoint = register(api_client_for(customer), receiver.url)
    first, second = _emit(customer), _emit(customer)
    real_post = webhook_delivery._post

    def post(target, body, headers, **kwargs):
        if headers["Sagarunner-Event-Id"] == first:
            raise UnicodeEncodeError("latin-1", "пример", 0, 6, "ordinal not in range(256)")
        return real_post(target, body, headers, **kwargs)

    monkeypatch.setattr(webhook_delivery, "_post", post)
    assert deliver_endpoint(endpoint["id"]) == 2
    failed = Delivery.objects.get(event_id=first)
    _pending_with_backoff(failed, "UnicodeEncodeError: 'latin-1' codec can't encode")
    assert Delivery.objects.get(event_id=second).status == DeliveryStatus.DELIVERED
    assert [event["id"] for event in receiver.accepted()] == [second]


def test_an_attempt_that_never_records_backs_off_then_is_dead_past_its_window(customer, settings):
    """A worker that claims a delivery and dies before recording anything: the claim already
    put the next attempt a backoff ahead, so once the lease is over the endpoint's next
    delivery is claimed first; when the window is over the unrecorded one is dead, not
    attempted again and again."""
    settings.WEBHOOKS_BACKOFF_BASE = 100.0
    endpoint = register(api_client_for(customer), "http://127.0.0.1:9/hooks")
    first, second = _emit(customer), _emit(customer)
    claimed, _ = webhook_delivery.claim_next(endpoint["id"])
    assert str(claimed.event_id) == first
    lost = Delivery.objects.get(pk=claimed.pk)
    assert lost.next_attempt_at > lost.last_attempt_at  # a backoff, before any outcome
    # Its worker is gone: the lease runs out.
    Delivery.objects.filter(pk=lost.pk).update(lease_until=timezone.now())
    claimed, _ = webhook_delivery.claim_next(endpoint["id"])
    assert str(claimed.event_id) == second

    # Past its window by the time it is due again (the claim put it after its retry_until):
    # dead at the next claim, which takes nothing else instead.
    now = timezone.now()
    Delivery.objects.filter(pk=claimed.pk).update(status=DeliveryStatus.DELIVERED)
    Delivery.objects.filter(pk=lost.pk).update(
        retry_until=now - timedelta(seconds=2), next_attempt_at=now - timedelta(seconds=1)
    )
    assert webhook_delivery.claim_next(endpoint["id"]) is None
    lost.refresh_from_db()
    assert (lost.status, lost.attempts, lost.lease_until) == (DeliveryStatus.DEAD, 1, None)
    assert lost.last_error == webhook_delivery.UNRECORDED


def test_an_excerpt_setting_above_its_column_keeps_what_the_column_holds(
    customer, receiver, settings
):
    """A worker started without the system check (webhooks.E001) and an excerpt setting above
    the column's 500: the answer's first 500 characters are kept and the delivery is recorded
    delivered (the longer excerpt failed the record: the event was sent again after every
    backoff and never recorded delivered)."""
    settings.WEBHOOKS_RESPONSE_EXCERPT = 1000
    endpoint = register(api_client_for(customer), receiver.url)
    _emit(customer)
    assert deliver_endpoint(endpoint["id"]) == 1
    delivery = Delivery.objects.get(endpoint_id=endpoint["id"])
    assert delivery.status == DeliveryStatus.DELIVERED
    assert delivery.response_excerpt == receiver.reply.decode()[:500]


def test_a_lookup_that_eats_the_lease_sends_nothing_and_is_a_failed_attempt(
    customer, receiver, resolver, settings, monkeypatch
):
    """The name's lookup runs before the send's own deadline: one that took most of the lease
    (a slow resolver; here its clock jumps by the whole lease) must not start a send that
    would outlast it while the sweeper starts a second attempt. Nothing is sent; the attempt
    fails as timed out and is retried after its backoff."""
    settings.WEBHOOKS_ALLOW_PRIVATE = True
    port = receiver.server.server_address[1]
    endpoint = register(api_client_for(customer), f"http://{HOST}:{port}/hooks")
    _emit(customer)
    resolver.answers = ["127.0.0.1"]
    real_monotonic, skew = webhook_delivery._monotonic, [0.0]
    looked_up = socket.getaddrinfo

    def slow_lookup(host, *args, **kwargs):
        if host == HOST:
            skew[0] += webhook_delivery._lease_seconds()
        return looked_up(host, *args, **kwargs)

    monkeypatch.setattr(webhook_delivery, "_monotonic", lambda: real_monotonic() + skew[0])
    monkeypatch.setattr(socket, "getaddrinfo", slow_lookup)
    assert deliver_endpoint(endpoint["id"]) == 1
    delivery = Delivery.objects.get(endpoint_id=endpoint["id"])
    assert delivery.status == DeliveryStatus.PENDING and delivery.attempts == 1
    assert delivery.last_error.startswith("AttemptTimedOut: the host name took "), (
        delivery.last_error
    )
    assert receiver.all() == []
