"""System checks of the webhooks app.

``manage.py check --deploy``: a production deployment must not let webhooks reach its own
network. ``WEBHOOKS_ALLOW_PRIVATE`` lifts the https-only and public-address rules so that
development and tests can deliver to a receiver on 127.0.0.1. Left on in production it turns
every client's webhook into a way to make our servers POST to the database, the cache or the
cloud metadata address, so the deploy check warns (and ``--fail-level WARNING`` refuses the
deployment).

Every ``manage.py`` command (``migrate``, ``runserver``, ``check``): ``WEBHOOKS_RESPONSE_EXCERPT``
must fit the column that keeps it. Larger, every answer longer than the column failed its
attempt's record; a worker now cuts the excerpt to the column, so the setting would silently
promise more than is kept.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.checks import CheckMessage, Error, Tags, Warning, register

from webhooks.models import RESPONSE_EXCERPT_MAX


@register(Tags.security, deploy=True)
def check_private_webhooks_off(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """Warn when webhook endpoints may use plain http and internal addresses."""
    if not settings.WEBHOOKS_ALLOW_PRIVATE:
        return []
    return [
        Warning(
            "WEBHOOKS_ALLOW_PRIVATE is on: webhook endpoints may use plain http and loopback, "
            "private or link-local addresses (the cloud metadata service among them).",
            hint="Unset WEBHOOKS_ALLOW_PRIVATE outside development and tests.",
            id="webhooks.W001",
        )
    ]


@register("webhooks")
def check_response_excerpt(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """Refuse a WEBHOOKS_RESPONSE_EXCERPT the delivery's column cannot hold (or a negative
    one, which would read a receiver's whole answer)."""
    value = settings.WEBHOOKS_RESPONSE_EXCERPT
    if isinstance(value, int) and 0 <= value <= RESPONSE_EXCERPT_MAX:
        return []
    return [
        Error(
            f"WEBHOOKS_RESPONSE_EXCERPT is {value!r}: it must be a number of bytes from 0 to "
            f"{RESPONSE_EXCERPT_MAX}, what a delivery's response_excerpt column holds.",
            hint=f"Set WEBHOOKS_RESPONSE_EXCERPT to at most {RESPONSE_EXCERPT_MAX}.",
            id="webhooks.E001",
        )
    ]
