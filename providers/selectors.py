"""Read-only views of the providers' shared state (ops console, metrics, chaos summary)."""

from __future__ import annotations

from typing import Any

from django.utils import timezone

from providers.breaker import window_counts
from providers.models import Breaker, CallSlot


def in_flight(provider: str) -> int:
    """Calls holding one of the provider's slots now (expired leases are not counted)."""
    return CallSlot.objects.filter(provider=provider, lease_until__gt=timezone.now()).count()


def breaker_overview(parked: dict[str, int] | None = None) -> list[dict[str, Any]]:
    """One row per known provider: state, since when, failure rate, in flight, parked sagas."""
    parked = parked or {}
    now = timezone.now()
    names = set(Breaker.objects.values_list("provider", flat=True)) | set(parked)
    out = []
    breakers = {b.provider: b for b in Breaker.objects.all()}
    for name in sorted(names):
        b = breakers.get(name)
        calls, failed = window_counts(name, now) if b is not None else (0, 0)
        out.append(
            {
                "provider": name,
                "state": b.state if b else "closed",
                "since": b.since if b else None,
                "probe_at": b.probe_at if b else None,
                "forced": bool(b and b.forced),
                "calls": calls,
                "failed": failed,
                "failure_rate": round(failed / calls, 3) if calls else 0.0,
                "in_flight": in_flight(name),
                "parked": parked.get(name, 0),
            }
        )
    return out
