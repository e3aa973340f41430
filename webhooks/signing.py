"""The ``Sagarunner-Signature`` header: ``t=<unix seconds>,v1=<hex HMAC-SHA256>``.

The MAC covers ``"<t>.<body>"``, so a receiver that checks it and rejects an old ``t`` is safe
against both forged and replayed deliveries. During a secret rotation the header carries one
``v1=`` per valid secret (new first); a receiver accepts the delivery if any of them matches.
"""

from __future__ import annotations

import hashlib
import hmac
import time

HEADER = "Sagarunner-Signature"


def signature(secret: str, timestamp: int, body: bytes) -> str:
    return hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def sign(secrets: list[str], body: bytes, timestamp: int | None = None) -> str:
    """The header value for ``body`` signed with each of ``secrets``."""
    t = int(time.time()) if timestamp is None else timestamp
    return ",".join([f"t={t}", *(f"v1={signature(s, t, body)}" for s in secrets)])


def verify(secret: str, header: str, body: bytes, *, tolerance: float = 300.0) -> bool:
    """What a receiver does (docs/webhooks.md shows the same in ten lines)."""
    fields = [part.split("=", 1) for part in header.split(",") if "=" in part]
    stamps = [v for k, v in fields if k == "t"]
    if len(stamps) != 1 or not stamps[0].isdigit():
        return False
    t = int(stamps[0])
    if abs(time.time() - t) > tolerance:
        return False
    expected = signature(secret, t, body)
    return any(hmac.compare_digest(expected, v) for k, v in fields if k == "v1")
