"""Per-provider knobs: ``SAGA_PROVIDER_DEFAULTS`` overridden by ``SAGA_PROVIDERS[name]``."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured


@dataclass(frozen=True)
class ProviderConfig:
    """What one provider's breaker and limits do.

    ``window``: seconds of call outcomes the failure rate is computed over.
    ``min_calls``: outcomes in the window before the rate may open the breaker; that many
    failures within two seconds (at the rate) or in a row open it too (``breaker._maybe_open``).
    ``failure_rate``: fraction of failed calls (0-1) that opens it.
    ``cooldown``: seconds open before canaries are let through (half-open).
    ``canaries``: calls let through while half-open; judged by ``failure_rate``
    (``breaker.canary_verdicts``).
    ``max_in_flight``: calls running at once across all workers (0: no limit).
    ``rate``: calls started per second across all workers (0: no limit).
    ``release_spread``: parked sagas retry spread over this many seconds after a probe time,
    so a recovered provider gets waves, not the whole backlog at once.
    ``park_max``: 0 (the default): a parked saga looks again at every probe. Above 0, a saga
    that finds the breaker still not closed after a stay of N seconds looks again after about
    N more seconds, up to this many (``breaker.recheck_after``), for a backlog too large to
    bring back at every probe. Either way a closing breaker wakes its parked sagas
    (``breaker_closed``).
    """

    window: float = 30.0
    min_calls: int = 10
    failure_rate: float = 0.5
    cooldown: float = 10.0
    canaries: int = 3
    max_in_flight: int = 50
    rate: float = 0.0
    release_spread: float = 5.0
    park_max: float = 0.0


_KNOBS = {f.name: f.type for f in fields(ProviderConfig)}
_cache: tuple[int, dict[str, ProviderConfig]] | None = None


def _build(name: str) -> ProviderConfig:
    merged = {**settings.SAGA_PROVIDER_DEFAULTS, **(settings.SAGA_PROVIDERS or {}).get(name, {})}
    values: dict[str, Any] = {}  # ints and floats, each as its field declares
    for key, value in merged.items():
        if key not in _KNOBS:
            raise ImproperlyConfigured(
                f"SAGA_PROVIDERS[{name!r}]: unknown knob {key!r}; known: {', '.join(_KNOBS)}"
            )
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ImproperlyConfigured(
                f"SAGA_PROVIDERS[{name!r}][{key!r}] must be a non-negative number"
            )
        values[key] = int(value) if _KNOBS[key] in (int, "int") else float(value)
    config = ProviderConfig(**values)
    if config.failure_rate > 1:
        raise ImproperlyConfigured(f"SAGA_PROVIDERS[{name!r}]['failure_rate'] must be <= 1")
    return config


def check_provider_settings(known: set[str]) -> None:
    """Parse ``SAGA_PROVIDERS`` and the defaults now, for every provider it names, and refuse a
    provider no step calls (``known``): raises ``ImproperlyConfigured`` naming the culprit.

    A worker calls this at start. The knobs are otherwise read at a provider's first call, so a
    typo let the worker start and failed every saga that reached that provider, each failure
    spending one of the saga's attempts.
    """
    providers = settings.SAGA_PROVIDERS or {}
    if not isinstance(providers, dict):
        raise ImproperlyConfigured("SAGA_PROVIDERS must be a JSON object: provider -> knobs")
    for name, knobs in providers.items():
        if name not in known:
            raise ImproperlyConfigured(
                f"SAGA_PROVIDERS: no step calls a provider {name!r}; "
                f"known: {', '.join(sorted(known)) or 'none'}"
            )
        if not isinstance(knobs, dict):
            raise ImproperlyConfigured(f"SAGA_PROVIDERS[{name!r}] must be a JSON object of knobs")
    for name in sorted(known | set(providers)):
        _build(name)


def provider_config(name: str) -> ProviderConfig:
    """The knobs of ``name``, parsed once per process (re-read if the settings object changed)."""
    global _cache
    key = id(settings.SAGA_PROVIDERS), id(settings.SAGA_PROVIDER_DEFAULTS)
    if _cache is None or _cache[0] != hash(key):
        _cache = (hash(key), {})
    configs = _cache[1]
    if name not in configs:
        configs[name] = _build(name)
    return configs[name]


def breakers_enabled() -> bool:
    return bool(settings.SAGA_PROVIDER_BREAKERS)
