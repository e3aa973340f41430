"""Outages of the fake providers that every worker on every host sees (game days, chaos, tests).

``provider_outage payments --seconds 60`` writes one row; each process re-reads the rows at
most every :data:`REFRESH` seconds, so an outage starts and ends everywhere within that time.
While a provider is down, every call to it fails as a transient error before doing anything,
and is counted, so a run can show how many calls the provider got while it was down.
"""

from __future__ import annotations

import time
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import F
from django.db.models.functions import Greatest
from django.utils import timezone

from providers.models import FakeProviderStatus

PROVIDERS = ("inventory", "payments", "shipping")
REFRESH = 0.25

_down: dict[str, float] = {}
_read_at = float("-inf")
_stat_rows: set[str] = set()


def start(provider: str, seconds: float) -> FakeProviderStatus:
    """Take ``provider`` down for ``seconds`` from now (replacing any outage under way)."""
    if provider not in PROVIDERS:
        raise ValueError(f"unknown provider {provider!r}; known: {', '.join(PROVIDERS)}")
    now = timezone.now()
    row, _ = FakeProviderStatus.objects.update_or_create(
        provider=provider,
        defaults={
            "down_since": now,
            "down_until": now + timedelta(seconds=seconds),
            "calls_while_down": 0,
        },
    )
    return row


def end(provider: str) -> bool:
    """Bring ``provider`` back now; ``False`` if it was not down."""
    if provider not in PROVIDERS:
        raise ValueError(f"unknown provider {provider!r}; known: {', '.join(PROVIDERS)}")
    now = timezone.now()
    return bool(
        FakeProviderStatus.objects.filter(provider=provider, down_until__gt=now).update(
            down_until=now
        )
    )


def is_down(provider: str) -> bool:
    """Whether ``provider`` is down, as this process last read it (at most REFRESH old)."""
    global _down, _read_at
    mono = time.monotonic()
    if mono - _read_at >= REFRESH:
        now = timezone.now()
        _down = {
            name: until.timestamp()
            for name, until in FakeProviderStatus.objects.filter(down_until__gt=now).values_list(
                "provider", "down_until"
            )
            if until is not None  # never, past the filter; tells the type checker so
        }
        _read_at = mono
    until = _down.get(provider)
    return until is not None and time.time() < until


def count_call_while_down(provider: str) -> None:
    FakeProviderStatus.objects.filter(provider=provider).update(
        calls_while_down=F("calls_while_down") + 1
    )


def stats_enabled() -> bool:
    return bool(settings.SAGA_FAKE_PROVIDER_STATS)


def call_started(provider: str) -> None:
    """Count a call and how many run at once, from the provider's side (stats runs only)."""
    if provider not in _stat_rows:
        FakeProviderStatus.objects.get_or_create(provider=provider)
        # Only once the row is there for good: made inside a step's transaction that then
        # rolls back, it is gone again, and the next call must make it again.
        transaction.on_commit(lambda: _stat_rows.add(provider))
    FakeProviderStatus.objects.filter(provider=provider).update(
        in_flight=F("in_flight") + 1,
        peak_in_flight=Greatest(F("peak_in_flight"), F("in_flight") + 1),
        calls=F("calls") + 1,
    )


def call_ended(provider: str) -> None:
    FakeProviderStatus.objects.filter(provider=provider).update(in_flight=F("in_flight") - 1)
