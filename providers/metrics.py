"""Prometheus metrics of the provider breakers.

Counters are recorded by whichever worker process saw the event (multiprocess mode adds them
up); the gauges are read from the shared rows at scrape time, because the rows are the truth
(:mod:`providers.collector`, which sits above the breaker: the breaker records counters here).
"""

from __future__ import annotations

from prometheus_client import Counter

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
    "Times a saga was parked for a provider: its breaker not closed (state open or "
    "half_open), or failing before it opened (state failing)",
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
