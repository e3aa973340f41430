"""The ``Idempotency-Key`` header every creating ``POST`` of the API takes: how a key is read
and how "the same request" is told apart from another one under the same key.

Shared by the order placement (``orders.idempotency``, which keeps the first response) and
the webhook registration (``webhooks.services.endpoint_create``, which keeps the endpoint it
made), so a client retrying either after a lost answer gets the first outcome again, and the
same rules for a key apply to both.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from config.errors import AppError
from config.text import has_control_characters, trimmed

MAX_KEY_LENGTH = 255


class IdempotencyError(AppError):
    code = "idempotency_error"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class IdempotencyKeyInvalid(IdempotencyError):
    """A key that cannot be kept (empty, too long, control characters): the header's fault,
    so its message is under ``fields["Idempotency-Key"]``, the one shape on every route that
    takes a key (an order, a webhook registration, a signal), as a body's fault is under its
    path."""

    code = "invalid_idempotency_key"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.fields = {"Idempotency-Key": [detail]}


class IdempotencyKeyReused(IdempotencyError):
    """The key was first used with another request body (a ``422``)."""

    code = "idempotency_key_reused"
    http_status = 422


def request_fingerprint(data: Any) -> str:
    """sha256 of the canonical JSON of a parsed request body (key order and spacing ignored)."""
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def clean_key(raw: str | None) -> str | None:
    """The key from the header, or ``None`` without one; refuses empty or over-long keys."""
    if raw is None:
        return None
    key = raw.strip()
    if has_control_characters(key):
        raise IdempotencyKeyInvalid("The Idempotency-Key header may not hold control characters.")
    # Empty also when all it holds cannot be seen: a key of nothing but a zero-width space
    # passed for one, while a no-break space alone counted as empty. The key itself stays as
    # stripped, as keys were kept before: a retry of one kept then must still find it.
    if not trimmed(key):
        raise IdempotencyKeyInvalid("The Idempotency-Key header is empty.")
    if len(key) > MAX_KEY_LENGTH:
        raise IdempotencyKeyInvalid(
            f"The Idempotency-Key header may be at most {MAX_KEY_LENGTH} characters."
        )
    return key
