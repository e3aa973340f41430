"""The breakers' gauges, read from the database when Prometheus scrapes.

Apart from :mod:`providers.metrics` (the counters the breaker records) because it reads
through :mod:`providers.selectors`, which reads the breaker's window: imports run one way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import GaugeMetricFamily

from providers.selectors import breaker_overview

_STATE_VALUE = {"closed": 0, "half_open": 1, "open": 2}


class BreakerCollector:
    """Per-provider gauges read from the database when scraped.

    ``parked`` is a callable giving ``{provider: sagas parked on it}`` (the engine knows which
    sagas wait; this app does not look at sagas).
    """

    def __init__(self, parked: Callable[[], dict[str, int]] | None = None) -> None:
        self.parked = parked

    def collect(self) -> Iterator[GaugeMetricFamily]:
        rows = breaker_overview(parked=self.parked() if self.parked else {})
        state = GaugeMetricFamily(
            "provider_breaker_state",
            "Breaker state: 0 closed, 1 half-open, 2 open",
            labels=["provider"],
        )
        rate = GaugeMetricFamily(
            "provider_failure_rate", "Failure rate over the breaker's window", labels=["provider"]
        )
        in_flight = GaugeMetricFamily(
            "provider_calls_in_flight", "Calls holding a slot right now", labels=["provider"]
        )
        parked = GaugeMetricFamily(
            "provider_parked_sagas", "Sagas waiting for the provider's breaker", labels=["provider"]
        )
        for row in rows:
            state.add_metric([row["provider"]], _STATE_VALUE.get(row["state"], 0))
            rate.add_metric([row["provider"]], row["failure_rate"])
            in_flight.add_metric([row["provider"]], row["in_flight"])
            parked.add_metric([row["provider"]], row["parked"])
        yield from (state, rate, in_flight, parked)
