"""Shared state of the downstream providers the saga steps call, kept in PostgreSQL.

Every worker on every host reads and writes these rows, so one breaker per provider holds for
the whole fleet, and a worker restart loses nothing: the window, the breaker and the call
slots are rows, not process memory.
"""

from __future__ import annotations

from django.db import models


class BreakerState(models.TextChoices):
    CLOSED = "closed", "closed"
    OPEN = "open", "open"
    HALF_OPEN = "half_open", "half-open"


class Breaker(models.Model):
    """One provider's circuit breaker."""

    provider = models.CharField(max_length=64, primary_key=True)
    state = models.CharField(max_length=16, choices=BreakerState.choices, default="closed")
    #: When the breaker entered its state.
    since = models.DateTimeField()
    #: Open: when canaries may go. Half-open: when canaries still out are presumed lost.
    probe_at = models.DateTimeField(null=True, blank=True)
    #: Canaries let through in this half-open round, and how many of them succeeded or failed.
    canaries = models.PositiveIntegerField(default=0)
    canary_ok = models.PositiveIntegerField(default=0)
    canary_failed = models.PositiveIntegerField(default=0, db_default=0)
    #: Bumped each time a half-open round begins; a canary carries the round that let it
    #: through, and only the current round's canaries move the counts above (a slow one
    #: answering after its round ended must not decide a round it did not belong to).
    canary_round = models.PositiveIntegerField(default=0, db_default=0)
    #: Held open by a person: no canaries until someone force-closes it.
    forced = models.BooleanField(default=False)
    #: Bumped each time the breaker closes: only calls admitted since then count in its
    #: window, so failures from before a recovery cannot re-open it.
    generation = models.PositiveIntegerField(default=0)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["provider"]

    def __str__(self) -> str:
        return f"{self.provider}: {self.state}"


class HealthBucket(models.Model):
    """Outcomes of calls to one provider in one second (the sliding window's unit)."""

    provider = models.CharField(max_length=64)
    generation = models.PositiveIntegerField(default=0)
    second = models.BigIntegerField()
    ok = models.PositiveIntegerField(default=0)
    failed = models.PositiveIntegerField(default=0)
    #: Calls admitted in this second (the optional calls-per-second limit).
    started = models.PositiveIntegerField(default=0)
    #: Failures counted in this second since its last success (all of them if none): with the
    #: seconds before it, how many calls in a row have failed (``breaker._maybe_open``). A
    #: second's totals cannot say so once it holds a success: the outage may have begun in it.
    failed_since_ok = models.PositiveIntegerField(default=0, db_default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["provider", "generation", "second"], name="health_bucket_uniq"
            )
        ]

    def __str__(self) -> str:
        return f"{self.provider}@{self.second}: {self.ok} ok, {self.failed} failed"


class CallSlot(models.Model):
    """One of a provider's ``max_in_flight`` call slots, held under a lease.

    A worker killed mid-call cannot leak its slot for longer than the lease (the step timeout).
    """

    provider = models.CharField(max_length=64)
    n = models.PositiveIntegerField()
    lease_until = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["provider", "n"], name="call_slot_uniq")]

    def __str__(self) -> str:
        return f"{self.provider} slot {self.n}"


class FakeProviderStatus(models.Model):
    """Fault injection for the fake providers: an outage every worker sees, and call counts."""

    provider = models.CharField(max_length=64, primary_key=True)
    down_until = models.DateTimeField(null=True, blank=True)
    down_since = models.DateTimeField(null=True, blank=True)
    #: Calls that reached the provider while it was down (since the last outage began).
    calls_while_down = models.PositiveIntegerField(default=0)
    #: With SAGA_FAKE_PROVIDER_STATS: calls running right now, and the most ever at once.
    in_flight = models.IntegerField(default=0)
    peak_in_flight = models.IntegerField(default=0)
    calls = models.PositiveBigIntegerField(default=0)

    def __str__(self) -> str:
        return f"{self.provider}: down until {self.down_until}"
