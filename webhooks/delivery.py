"""Delivering the outbox: one endpoint at a time, each subject's events in sequence order.

A ``webhooks.deliver`` task is a doorbell for one endpoint: "E may have due deliveries". It
claims E's next due delivery (under a lock on the endpoint row, so at most one attempt per
endpoint is in flight), POSTs it with short timeouts, records the outcome fenced on the
attempt, and goes on with E's next one until nothing is due or its time budget is spent (then
it rings again and yields the worker to other endpoints' doorbells). So:

- per endpoint and subject, a delivery goes out only once every earlier one is delivered or
  dead (in order per order);
- a slow endpoint holds at most one worker slot at a time, for at most the timeouts, and
  webhook tasks run on their own queue (``WEBHOOKS_QUEUE``), never beside saga steps;
- a failure, whatever raised it, is retried with exponential backoff and jitter until
  ``retry_until`` (24 hours by default), then the delivery is dead; staff can redeliver it;
- a lost doorbell or a worker killed mid-attempt loses nothing: the sweeper rings every
  endpoint with an overdue delivery whose lease has expired, and the attempt is made again
  (at least once: receivers deduplicate by event id), after the backoff the claim set, so an
  attempt that never records holds back none of the endpoint's other deliveries;
- nothing is claimed for an endpoint staff switched off: its deliveries are held until it is
  switched back on.
"""

from __future__ import annotations

import contextlib
import random
import socket
import ssl
import threading
import time
from datetime import timedelta
from typing import Any

import structlog
import urllib3
from celery import current_app
from django.conf import settings
from django.db import transaction
from django.db.models import Exists, Min, OuterRef
from django.utils import timezone
from urllib3.util.ssl_ import create_urllib3_context

from sagas import tracing
from webhooks import signing
from webhooks.models import (
    ERROR_MAX,
    RESPONSE_EXCERPT_MAX,
    Delivery,
    DeliveryStatus,
    Endpoint,
    Event,
)
from webhooks.security import Target, UrlRefused, check_url

log = structlog.get_logger("webhooks.delivery")

USER_AGENT = "sagarunner-webhooks/1"

#: The doorbell task for one endpoint (declared in ``webhooks.tasks``).
DELIVER_TASK = "webhooks.deliver"


# ---------------------------------------------------------------------------------------------
# Doorbells
# ---------------------------------------------------------------------------------------------
def ring(endpoint_id: Any, countdown: float | None = None) -> None:
    """Ask a worker to deliver E's due deliveries. Never raises: the rows are already safe,
    and the sweeper rings again if this one is lost.

    Sent by the task's name (:data:`DELIVER_TASK`, declared in ``webhooks.tasks``, which
    imports this module; the webhooks app imports it when ready), so delivery needs nothing
    above it.
    """
    if countdown is not None and countdown > settings.WEBHOOKS_MAX_COUNTDOWN:
        return  # far in the future: the sweeper rings when it is due
    deliver = current_app.tasks[DELIVER_TASK]  # what shared_task's proxy resolves to
    try:
        deliver.apply_async(
            (str(endpoint_id),),
            countdown=countdown if countdown and countdown > 0 else None,
            retry=True,
            retry_policy={"max_retries": 1, "interval_start": 0.05, "interval_step": 0.2},
        )
    except Exception as exc:  # noqa: BLE001 - any broker failure is logged and forgotten
        log.warning("webhooks.doorbell_failed", endpoint_id=str(endpoint_id), error=repr(exc))


def backoff_delay(attempt: int) -> float:
    """``min(cap, base * 2**(attempt-1))`` times a jitter in [0.5, 1]."""
    base, cap = settings.WEBHOOKS_BACKOFF_BASE, settings.WEBHOOKS_BACKOFF_MAX
    return min(cap, base * 2 ** max(attempt - 1, 0)) * random.uniform(0.5, 1.0)


def _lease_seconds() -> float:
    return settings.WEBHOOKS_CONNECT_TIMEOUT + settings.WEBHOOKS_TIMEOUT + 10.0


#: Seconds of an attempt's lease kept free at its end (recording the outcome), and the least
#: time worth starting a send with.
LEASE_MARGIN = 3.0
MIN_SEND_SECONDS = 1.0
_monotonic = time.monotonic  # the attempt's own clock (a test makes a lookup slow with it)


# ---------------------------------------------------------------------------------------------
# Claim, send, record
# ---------------------------------------------------------------------------------------------
def _earlier_pending() -> Any:
    """An earlier delivery of the same subject to the same endpoint, still pending (waiting for
    its retry or in flight): what holds a delivery back, so a client sees an order's events in
    order."""
    return Delivery.objects.filter(
        endpoint_id=OuterRef("endpoint_id"),
        subject=OuterRef("subject"),
        status=DeliveryStatus.PENDING,
        sequence__lt=OuterRef("sequence"),
    )


def _in_flight_to(endpoint_id: Any, now: Any) -> Any:
    """The endpoint's delivery whose attempt holds a live lease: at most one at a time."""
    return Delivery.objects.filter(
        endpoint_id=endpoint_id, status=DeliveryStatus.PENDING, lease_until__gt=now
    )


def claim_next(endpoint_id: Any) -> tuple[Delivery, Endpoint] | None:
    """Lease the endpoint's next due delivery, or ``None`` if it has none it may send now.

    None while another attempt to the endpoint is in flight, and never a delivery with an
    earlier one of the same subject still pending (waiting for a retry or in flight).

    The claim already moves the delivery's next attempt a backoff ahead, as a failure would:
    an attempt that never records its outcome (its worker killed, or failing in a way nothing
    caught) backs off like any failure instead of staying the endpoint's oldest due delivery,
    claimed first by every doorbell and blocking all the others. A recorded outcome replaces
    that time. One that was claimed past its window and never recorded is dead at its next
    claim.
    """
    now = timezone.now()
    with transaction.atomic():
        # FOR NO KEY UPDATE: claims of the endpoint wait for one another, events being written
        # for it (which hold it FOR KEY SHARE, see event_emit) do not wait for them.
        endpoint = (
            Endpoint.objects.select_for_update(no_key=True)
            .filter(pk=endpoint_id, is_active=True)
            .first()
        )
        if endpoint is None:
            return None
        if _in_flight_to(endpoint.pk, now).exists():
            return None
        pending = Delivery.objects.filter(endpoint_id=endpoint.pk, status=DeliveryStatus.PENDING)
        due = pending.filter(next_attempt_at__lte=now).filter(~Exists(_earlier_pending()))
        while True:
            delivery = due.order_by("next_attempt_at", "id").first()
            if delivery is None:
                return None
            if delivery.next_attempt_at <= delivery.retry_until:
                break
            # Only a claim puts the next attempt past the window (a failure recorded then
            # makes the delivery dead instead): that last attempt never recorded.
            Delivery.objects.filter(pk=delivery.pk).update(
                status=DeliveryStatus.DEAD, lease_until=None, last_error=UNRECORDED
            )
        delivery.attempts += 1
        delivery.lease_until = now + timedelta(seconds=_lease_seconds())
        delivery.last_attempt_at = now
        delivery.next_attempt_at = now + timedelta(seconds=backoff_delay(delivery.attempts))
        delivery.save(
            update_fields=["attempts", "lease_until", "last_attempt_at", "next_attempt_at"]
        )
    return delivery, endpoint


#: The error of a delivery whose last attempt was claimed and never recorded.
UNRECORDED = "the last attempt never recorded its outcome (its worker stopped or failed)"


def _new_tls_context() -> ssl.SSLContext:
    context = create_urllib3_context(cert_reqs=ssl.CERT_REQUIRED)
    context.load_default_certs()
    return context


_tls = threading.local()


def tls_context() -> ssl.SSLContext:
    """The TLS context of this thread's https attempts, built on its first one.

    Building one loads the system's CA bundle: 10-20 ms of CPU, more than the rest of an
    attempt, paid per delivery while each connection built its own. One per thread, not per
    process: urllib3 sets options on the context for every connection (ALPN among them), and
    OpenSSL reads them while opening a connection without holding the GIL, so threads of the
    threads pool must not share one. Every connection still verifies the endpoint's
    certificate and its host name (urllib3 matches ``assert_hostname``, since the socket
    connects to a checked IP address). Trust follows OpenSSL's defaults, so ``SSL_CERT_FILE``
    or ``SSL_CERT_DIR`` in the worker's environment point it at another bundle; a worker reads
    the bundle once, so a change of the bundle needs a worker restart.
    """
    context = getattr(_tls, "context", None)
    if context is None:
        context = _tls.context = _new_tls_context()
    return context


def forget_tls_context() -> None:
    """Build this thread's context again on its next attempt (after a change of trust)."""
    _tls.__dict__.pop("context", None)


class AttemptTimedOut(urllib3.exceptions.TimeoutError):
    """The endpoint did not answer in full within ``WEBHOOKS_CONNECT_TIMEOUT +
    WEBHOOKS_TIMEOUT``, however steadily its bytes came."""


class _Deadline:
    """Cuts an attempt off at a total time, not only at a silence.

    urllib3's timeouts bound the connect and each read: a receiver that sends its answer a
    byte at a time, never silent for a whole read timeout, would keep the attempt going past
    its delivery's lease, and the sweeper would then start a second attempt to the endpoint
    beside it. When the time is up, a timer shuts the attempt's socket down, which ends the
    blocked read at once; the attempt fails as timed out and is retried like any other.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.passed = False
        self._done = False
        self._ends = 0.0
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> _Deadline:
        self._ends = _monotonic() + self.seconds
        self._timer.start()
        return self

    def left(self) -> float:
        """Seconds until the attempt is cut off."""
        return self._ends - _monotonic()

    def __exit__(self, *exc: object) -> None:
        self.finish()

    def finish(self) -> None:
        """No shutdown from now on: called before the attempt's socket is closed, so the
        timer never shuts a socket number that another connection has taken since."""
        with self._lock:
            self._done = True
        self._timer.cancel()

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            if not self.passed:
                self._sockets.append(sock)
                return
            _shut(sock)

    def _expire(self) -> None:
        with self._lock:
            if self._done:
                return
            self.passed = True
            for sock in self._sockets:
                _shut(sock)


def _shut(sock: socket.socket) -> None:
    # The plain socket's shutdown, also for a TLS socket (whose own would drop its TLS state
    # under the reading thread's feet): the blocked read sees the end of the stream.
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


class NoAddressAccepted(urllib3.exceptions.NewConnectionError):
    """None of the endpoint's checked addresses took the connection (refused, unreachable,
    no answer in time): nothing of the request was sent."""

    def __init__(self, conn: Any, message: str) -> None:
        super().__init__(conn, message)
        self.args = (message,)  # without urllib3's "<connection object at 0x...>: "


def _connect(address: str, port: int, timeout: float, options: Any) -> socket.socket:
    """A TCP connection to the IP address itself: no lookup of any name."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        for option in options or ():
            sock.setsockopt(*option)
        sock.settimeout(timeout)
        sock.connect((address, port))
    except BaseException:
        sock.close()
        raise
    return sock


#: The timeout of a connection made as the attempt's time ran out: its handshake or request
#: fails at once (and the deadline's timer shuts its socket).
_LAST_MOMENT = 0.01


def _why(exc: OSError, timeout: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout:.3g} s"
    return exc.strerror or str(exc) or type(exc).__name__


def _watched(cls: type, deadline: _Deadline, target: Target) -> type:
    """``cls`` (urllib3's connection class) connecting to the target's checked addresses, and
    reporting its socket to ``deadline`` once open.

    The addresses are tried in turn, the next one only when a connection could not be made
    (refused, unreachable, no answer): no byte of the request has gone anywhere then. Once one
    takes the connection the attempt stays with it, whatever fails later (the TLS handshake,
    the request, the answer): the endpoint may have the event by then, and the attempt fails
    as it always did, to be retried with the same event id. Each address gets
    ``WEBHOOKS_CONNECT_TIMEOUT``, or what is left of the attempt's time if less, and so does
    the TLS handshake after it: together they never carry the attempt past its deadline, so
    past its lease.
    """

    class Watched(cls):
        def _new_conn(self) -> socket.socket:
            addresses, failed = target.addresses, []
            for n, address in enumerate(addresses):
                left = deadline.left()
                if left <= 0:
                    failed.append(
                        f"and the attempt's {deadline.seconds:.3g} s were up before "
                        f"{', '.join(addresses[n:])} could be tried"
                    )
                    break
                timeout = left if self.timeout is None else min(self.timeout, left)
                try:
                    sock = _connect(address, self.port, timeout, self.socket_options)
                except OSError as exc:
                    why = _why(exc, timeout)
                    failed.append(f"{address} ({why})")
                    log.info(
                        "webhooks.connect_failed",
                        host=target.host,
                        port=self.port,
                        address=address,
                        error=why,
                        next_address=addresses[n + 1] if n + 1 < len(addresses) else None,
                    )
                    continue
                # The TLS handshake runs on the socket's timeout, before the deadline watches the
                # socket (urllib3 wraps it once this returns): no more than what is left.
                sock.settimeout(max(min(timeout, deadline.left()), _LAST_MOMENT))
                return sock
            raise NoAddressAccepted(
                self,
                f"no address of {target.host} accepted a connection on port {self.port}: "
                + ", ".join(failed),
            )

        def connect(self) -> None:
            super().connect()
            deadline.watch(self.sock)

    return Watched


def _post(
    target: Target, body: bytes, headers: dict[str, str], budget: float | None = None
) -> tuple[int, str]:
    """POST to the checked addresses themselves (no second DNS lookup), the first that takes
    the connection; the status and the first bytes of the body. Redirects are not followed
    (one could point anywhere).

    The whole exchange, connections tried included, ends within ``WEBHOOKS_CONNECT_TIMEOUT +
    WEBHOOKS_TIMEOUT``, or within ``budget`` seconds if less is left of the lease (raising
    :class:`AttemptTimedOut` past it, or :class:`NoAddressAccepted` if no connection was made
    by then), so it never outlasts the delivery's lease.
    """
    timeout = urllib3.Timeout(
        connect=settings.WEBHOOKS_CONNECT_TIMEOUT, read=settings.WEBHOOKS_TIMEOUT
    )
    seconds = settings.WEBHOOKS_CONNECT_TIMEOUT + settings.WEBHOOKS_TIMEOUT
    if budget is not None:
        seconds = min(seconds, budget)
    with _Deadline(seconds) as deadline:
        timed_out = AttemptTimedOut(f"no complete answer within {deadline.seconds:g} s")
        try:
            answer = _exchange(target, body, headers, timeout, deadline)
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            # NoAddressAccepted names each address and what became of it, the time running out
            # included.
            if deadline.passed and not isinstance(exc, NoAddressAccepted):
                raise timed_out from exc
            raise
    if deadline.passed:
        # Cut off after the status line came: the rest of the answer (its headers, say) never
        # did. Not taken as delivered; the retry sends the same event id again.
        raise timed_out
    return answer


def _exchange(
    target: Target,
    body: bytes,
    headers: dict[str, str],
    timeout: urllib3.Timeout,
    deadline: _Deadline,
) -> tuple[int, str]:
    # The pool is named after the host (its errors name the host, not an address it may not
    # have connected to); its connections connect to the checked addresses, never to the name.
    options: dict[str, Any] = {"timeout": timeout, "retries": False, "maxsize": 1}
    if target.scheme == "https":
        pool: urllib3.HTTPConnectionPool = urllib3.HTTPSConnectionPool(
            target.host,
            target.port,
            server_hostname=target.host,
            assert_hostname=target.host,
            cert_reqs="CERT_REQUIRED",
            ssl_context=tls_context(),
            **options,
        )
    else:
        pool = urllib3.HTTPConnectionPool(target.host, target.port, **options)
    pool.ConnectionCls = _watched(pool.ConnectionCls, deadline, target)
    default_port = 443 if target.scheme == "https" else 80
    host = target.host if ":" not in target.host else f"[{target.host}]"
    headers = {
        **headers,
        "Host": host if target.port == default_port else f"{host}:{target.port}",
    }
    try:
        response = pool.urlopen(
            "POST",
            target.path,
            body=body,
            headers=headers,
            redirect=False,
            retries=False,
            preload_content=False,
        )
        try:
            excerpt = response.read(settings.WEBHOOKS_RESPONSE_EXCERPT)
        finally:
            deadline.finish()
            response.release_conn()
            response.close()
        # A receiver's bytes, kept in a text column: undecodable ones and NUL become U+FFFD.
        return response.status, excerpt.decode("utf-8", "replace").replace("\x00", "\ufffd")
    finally:
        pool.close()


def attempt(delivery: Delivery, endpoint: Endpoint) -> bool:
    """Make the claimed attempt and record it; True when the endpoint took the event."""
    with _in_saga_trace(delivery, endpoint):
        return _attempt(delivery, endpoint)


def _in_saga_trace(delivery: Delivery, endpoint: Endpoint):
    """With tracing on, the attempt is a span in the trace of the order's saga (the saga whose
    correlation id is the event's subject); off, nothing is read and nothing is opened."""
    if not tracing.is_enabled():
        return contextlib.nullcontext()
    from sagas.models import Saga

    subject = Event.objects.values_list("subject", flat=True).get(pk=delivery.event_id)
    saga = Saga.objects.filter(correlation_id=str(subject)).first()
    if saga is None:
        return contextlib.nullcontext()
    return tracing.saga_span(
        "webhook.deliver",
        saga,
        webhook_endpoint=str(endpoint.pk),
        webhook_event=str(delivery.event_id),
        webhook_attempt=delivery.attempts,
    )


def _attempt(delivery: Delivery, endpoint: Endpoint) -> bool:
    status: int | None = None
    excerpt = ""
    started = _monotonic()
    try:
        body = Event.objects.values_list("body", flat=True).get(pk=delivery.event_id).encode()
        target = check_url(endpoint.url)
        # The name's lookup runs before the exchange's own deadline and cannot be cut short:
        # a resolver that answers slowly must not carry the send past the lease, where the
        # sweeper starts a second attempt to the endpoint beside it.
        left = _lease_seconds() - LEASE_MARGIN - (_monotonic() - started)
        if left < MIN_SEND_SECONDS:
            raise AttemptTimedOut(
                f"the host name took {_monotonic() - started:.1f} s to resolve; "
                "no time was left to send"
            )
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            signing.HEADER: signing.sign(endpoint.signing_secrets(timezone.now()), body),
            "Sagarunner-Event-Id": str(delivery.event_id),
        }
        status, excerpt = _post(target, body, headers, budget=left)
        error = "" if 200 <= status < 300 else f"HTTP {status}"
    except UrlRefused as exc:
        # Staff read it in the ops console: the address, which the client is never told, too.
        error = f"refused: {exc.detail}" + (f" ({exc.address})" if exc.address else "")
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    except Exception as exc:  # noqa: BLE001 - recorded and retried like any failure
        # Unexpected (a host name http.client cannot put in a header, a soft time limit, a
        # bug): a failed attempt all the same, backed off and in the end dead, never one that
        # escapes unrecorded and is claimed again at once, ahead of the endpoint's others.
        log.exception("webhooks.attempt_failed", delivery_id=delivery.pk)
        status, excerpt, error = None, "", f"{type(exc).__name__}: {exc}"
    ok = status is not None and 200 <= status < 300
    # Should this write fail (the database gone), the backoff the claim set still stands.
    _record(delivery, ok=ok, status=status, error=error, excerpt=excerpt)
    return ok


def _record(delivery: Delivery, *, ok: bool, status: int | None, error: str, excerpt: str) -> None:
    """Write the attempt's outcome, fenced on the attempt: a newer claim (our lease expired
    and another worker took over) wins, and this outcome is dropped."""
    now = timezone.now()
    # Never more than the column holds, whatever WEBHOOKS_RESPONSE_EXCERPT says: the system
    # check (webhooks.E001) stops manage.py, not a worker started without it.
    kept = min(settings.WEBHOOKS_RESPONSE_EXCERPT, RESPONSE_EXCERPT_MAX)
    fields: dict[str, Any] = {
        "lease_until": None,
        "last_status_code": status,
        "last_error": error[:ERROR_MAX],
        "response_excerpt": excerpt[:kept],
    }
    delay = None
    if ok:
        fields.update(status=DeliveryStatus.DELIVERED, delivered_at=now)
    else:
        delay = backoff_delay(delivery.attempts)
        if now + timedelta(seconds=delay) > delivery.retry_until:
            fields["status"] = DeliveryStatus.DEAD
            delay = None
        else:
            fields["next_attempt_at"] = now + timedelta(seconds=delay)
    with transaction.atomic():
        updated = Delivery.objects.filter(
            pk=delivery.pk, attempts=delivery.attempts, status=DeliveryStatus.PENDING
        ).update(**fields)
        if updated and delay is not None:
            endpoint_id = delivery.endpoint_id
            transaction.on_commit(lambda: ring(endpoint_id, delay))
    log.info(
        "webhooks.attempt",
        delivery_id=delivery.pk,
        endpoint_id=str(delivery.endpoint_id),
        attempt=delivery.attempts,
        status=str(fields.get("status", DeliveryStatus.PENDING)),  # the value, not the member
        http_status=status,
        error=error,
        fenced=not updated,
    )


def deliver_endpoint(endpoint_id: Any) -> int:
    """The body of the ``webhooks.deliver`` task: attempts made."""
    started = time.monotonic()
    made = 0
    while True:
        claimed = claim_next(endpoint_id)
        if claimed is None:
            return made
        attempt(*claimed)
        made += 1
        if time.monotonic() - started > settings.WEBHOOKS_TASK_BUDGET:
            ring(endpoint_id)  # the rest after other endpoints' doorbells
            return made


# ---------------------------------------------------------------------------------------------
# Sweep and retention
# ---------------------------------------------------------------------------------------------
def sweep(now: Any = None) -> int:
    """Ring every active endpoint with an overdue delivery that a claim would send now, the
    longest overdue first, at most ``WEBHOOKS_SWEEP_BATCH`` of them.

    Only deliveries :func:`claim_next` would take: none held back behind an earlier one of the
    same subject (which may wait out a backoff of up to an hour, for as long as
    ``WEBHOOKS_RETRY_FOR``), none to an endpoint with an attempt in flight. Ringing those would
    wake a task that sends nothing, on every tick; with a batch's worth of such endpoints, an
    endpoint whose doorbell was really lost would never be rung.
    """
    now = now or timezone.now()
    overdue = now - timedelta(seconds=settings.WEBHOOKS_SWEEP_AFTER)
    endpoint_ids = list(
        Delivery.objects.filter(
            status=DeliveryStatus.PENDING,
            next_attempt_at__lte=overdue,
            endpoint__is_active=True,
        )
        # In flight: itself too.
        .filter(~Exists(_earlier_pending()), ~Exists(_in_flight_to(OuterRef("endpoint_id"), now)))
        .values("endpoint_id")
        .annotate(oldest=Min("next_attempt_at"))
        .order_by("oldest", "endpoint_id")
        .values_list("endpoint_id", flat=True)[: settings.WEBHOOKS_SWEEP_BATCH]
    )
    for endpoint_id in endpoint_ids:
        ring(endpoint_id)
    if endpoint_ids:
        log.info("webhooks.sweep_rang", count=len(endpoint_ids))
    return len(endpoint_ids)


def purge(now: Any = None) -> int:
    """Delete events older than WEBHOOKS_RETENTION_DAYS whose deliveries all succeeded (or
    that had none left), a batch per transaction so no long lock is held."""
    now = now or timezone.now()
    cutoff = now - timedelta(days=settings.WEBHOOKS_RETENTION_DAYS)
    unfinished = Delivery.objects.filter(event_id=OuterRef("pk")).exclude(
        status=DeliveryStatus.DELIVERED
    )
    deleted = 0
    while True:
        ids = list(
            Event.objects.filter(created_at__lt=cutoff)
            .filter(~Exists(unfinished))
            .order_by("created_at")
            .values_list("id", flat=True)[: settings.WEBHOOKS_PURGE_BATCH]
        )
        if not ids:
            return deleted
        with transaction.atomic():
            Delivery.objects.filter(event_id__in=ids).delete()
            Event.objects.filter(pk__in=ids).delete()
        deleted += len(ids)
