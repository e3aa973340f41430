"""Prometheus metrics of the provider breakers.

Counters are recorded by whichever worker process saw the event (multiprocess mode adds them
up); the gauges are read from the shared rows at scrape time, because the rows are the truth.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import Counter
from prometheus_client.core import GaugeMetricFamily

CALLS = Counter(
    "provider_calls_total",
    "Calls to a provider through its breaker, by outcome (failed: transient failures only)",
    ["provider", "outcome"],
)
TRANSITIONS = Counter(
    "provider_breaker_transitions_total",
    "Breaker transitions, by the state entered",
    ["provider", "to"],
)
PARKED = Counter(
    "provider_parked_total",
    "Times a saga was parked instead of calling a provider whose breaker was not closed",
    ["provider", "state"],
)
CANARIES = Counter(
    "provider_canaries_total", "Canary calls let through while half-open", ["provider"]
)
LIMITED = Counter(
    "provider_limited_total",
    "Times a call waited because the provider's in-flight or rate limit was reached",
    ["provider", "limit"],
)

_STATE_VALUE = {"closed": 0, "half_open": 1, "open": 2}


class BreakerCollector:
    """Per-provider gauges read from the database when scraped.

    ``parked`` is a callable giving ``{provider: sagas parked on it}`` (the engine knows which
    sagas wait; this app does not look at sagas).
    """

    def __init__(self, parked: Callable[[], dict[str, int]] | None = None) -> None:
        self.parked = parked

    def collect(self) -> Iterator[GaugeMetricFamily]:
        from providers.selectors import breaker_overview

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
