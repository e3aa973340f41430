"""``manage.py check --deploy``: a production deployment must not let webhooks reach its own
network.

``WEBHOOKS_ALLOW_PRIVATE`` lifts the https-only and public-address rules so that development
and tests can deliver to a receiver on 127.0.0.1. Left on in production it turns every client's
webhook into a way to make our servers POST to the database, the cache or the cloud metadata
address, so the deploy check warns (and ``--fail-level WARNING`` refuses the deployment).
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.checks import CheckMessage, Tags, Warning, register


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
