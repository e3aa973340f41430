"""The chaos run's webhook receivers: one endpoint per client, on 127.0.0.1, and the check of
guarantee 7 at the end.

Every chaos client registers an endpoint for every event type before it places orders; the
receiver (a threaded HTTP server in the chaos process) verifies each delivery's signature with
that client's secret and answers 200. After the run, every settled order's final event (the
one whose ``data.status`` is the order's final status) must have reached its own client,
signed; so must every other event the database holds for a client (every change it subscribed
to, at least once), and nothing else may have arrived (an event no committed change wrote, a
rolled-back one, is never sent); events of one order must have first arrived in ``sequence``
order; and no delivery may have carried a bad signature or gone to the wrong client.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from webhooks import signing

EVENTS = ["order.updated", "order.confirmed", "order.cancelled", "order.needs_attention"]
SETTLED_TYPES = {
    "confirmed": "order.confirmed",
    "cancelled": "order.cancelled",
    "needs_attention": "order.needs_attention",
}


@dataclass
class Receivers:
    """One URL per client (``/hooks/<n>``) on one loopback server."""

    server: ThreadingHTTPServer
    secrets: dict[int, str] = field(default_factory=dict)
    #: (client, event) in arrival order, for deliveries whose signature verified.
    received: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def url(self, client: int) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks/{client}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _take(self, client: int, headers: Any, body: bytes) -> int:
        secret = self.secrets.get(client)
        header = headers.get(signing.HEADER, "")
        with self.lock:
            if secret is None or not signing.verify(secret, header, body, tolerance=3600):
                if len(self.problems) < 50:
                    self.problems.append(f"[webhooks] client {client}: bad signature {header!r}")
                return 400
            try:
                event = json.loads(body)
            except ValueError:
                self.problems.append(f"[webhooks] client {client}: body is not JSON")
                return 400
            self.received.append((client, event))
        return 200


def start() -> Receivers:
    holder: dict[str, Receivers] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the http.server API
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            try:
                client = int(self.path.rsplit("/", 1)[1])
            except ValueError:
                client = -1
            status = holder["r"]._take(client, self.headers, body)
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    holder["r"] = Receivers(server)
    threading.Thread(target=server.serve_forever, name="chaos-webhooks", daemon=True).start()
    return holder["r"]


def register(receivers: Receivers, request: Callable[..., tuple[int, dict, Any]], tokens) -> None:
    """``POST /api/v1/webhooks/`` for every client; keep each secret for the receiver."""
    for client, token in enumerate(tokens):
        status, _, data = request(
            "POST", "/api/v1/webhooks/", token, {"url": receivers.url(client), "events": EVENTS}
        )
        if status != 201:
            raise RuntimeError(f"registering the webhook of client {client}: {status} {data}")
        receivers.secrets[client] = data["secret"]


def missing_final_events(receivers: Receivers, finals: dict[str, tuple[int, str]]) -> list[str]:
    """Orders (id -> (client, final status)) whose final event did not reach their client."""
    with receivers.lock:
        got = {
            (client, e["data"]["id"], e["type"], e["data"]["status"])
            for client, e in receivers.received
        }
    return [
        order_id
        for order_id, (client, status) in finals.items()
        if (client, order_id, SETTLED_TYPES[status], status) not in got
    ]


def undelivered_events(receivers: Receivers, committed: dict[str, int]) -> list[str]:
    """Committed events (id -> client) that did not reach their client."""
    with receivers.lock:
        got = {(client, e["id"]) for client, e in receivers.received}
    return [event_id for event_id, client in committed.items() if (client, event_id) not in got]


def check(
    receivers: Receivers,
    finals: dict[str, tuple[int, str]],
    wait: float,
    committed: dict[str, int] | None = None,
) -> list[str]:
    """Guarantee 7, waiting up to ``wait`` seconds for deliveries still on their way.

    ``committed``: every event the outbox holds for the clients (id -> client); each must have
    arrived, and no other event may have.
    """
    committed = committed or {}
    deadline = time.monotonic() + wait
    missing = missing_final_events(receivers, finals)
    undelivered = undelivered_events(receivers, committed)
    while (missing or undelivered) and time.monotonic() < deadline:
        time.sleep(1.0)
        missing = missing_final_events(receivers, finals)
        undelivered = undelivered_events(receivers, committed)
    violations = list(receivers.problems)
    violations += [
        f"[webhooks] order {o} ({finals[o][1]}): its final event never reached client "
        f"{finals[o][0]}"
        for o in missing[:50]
    ]
    violations += [
        f"[webhooks] event {e} was committed but never reached client {committed[e]}"
        for e in undelivered[:50]
    ]
    if committed:
        with receivers.lock:
            stray = sorted({e["id"] for _, e in receivers.received} - committed.keys())
        violations += [
            f"[webhooks] event {e} arrived, but no committed change wrote it" for e in stray[:50]
        ]
    first_seen: dict[str, list[int]] = {}
    seen_ids: set[str] = set()
    with receivers.lock:
        for client, e in receivers.received:
            order = e["data"]["id"]
            if order in finals and finals[order][0] != client:
                violations.append(f"[webhooks] order {order}: delivered to client {client}")
            if e["id"] in seen_ids:
                continue  # a redelivery (at least once): deduplicated by id
            seen_ids.add(e["id"])
            first_seen.setdefault(order, []).append(e["sequence"])
    for order, sequences in first_seen.items():
        if sequences != sorted(sequences):
            violations.append(f"[webhooks] order {order}: events first arrived as {sequences}")
    return violations


def stats(receivers: Receivers) -> tuple[int, int]:
    """(deliveries received, distinct events)."""
    with receivers.lock:
        return len(receivers.received), len({e["id"] for _, e in receivers.received})
