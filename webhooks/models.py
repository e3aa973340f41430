"""Webhook endpoints, the outbox of events, and one delivery per event and endpoint.

The outbox: an :class:`Event` row is written in the very transaction that changes what it
describes (a saga record, an ops operation), so an event exists exactly when its change
committed. Delivering it is a separate, retried job per endpoint (:class:`Delivery`); the
rows are the truth and a Celery message only says "endpoint E may have due deliveries".
"""

from __future__ import annotations

import uuid
from datetime import datetime

from django.conf import settings
from django.db import models
from django.db.models import Q

#: The event types a client can subscribe to.
EVENT_TYPES = ("order.updated", "order.confirmed", "order.cancelled", "order.needs_attention")

#: What a delivery keeps of its last attempt's error and answer, at most (its columns' size).
ERROR_MAX = 500
RESPONSE_EXCERPT_MAX = 500


class Endpoint(models.Model):
    """A URL of a client's that wants some event types, with the secret that signs them."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    # Indexed by webhook_endpoint_owner_idx (owner, is_active), which starts with it.
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.CASCADE,
        related_name="webhook_endpoints",
        db_index=False,
    )
    url = models.URLField(max_length=2000)
    #: Subscribed event types, a subset of EVENT_TYPES.
    events = models.JSONField(default=list)
    #: Signs every delivery. Kept in the clear because HMAC needs it; shown to the client once.
    secret = models.CharField(max_length=100)
    #: Secrets replaced by rotations that still sign until their grace ends, newest first:
    #: ``[{"secret": ..., "expires_at": ISO 8601}, ...]`` (see ``endpoint_rotate_secret``).
    previous_secrets = models.JSONField(default=list, blank=True)
    #: Staff can switch an endpoint off; its deliveries then wait (they are not dropped): the
    #: events it subscribed to are still written for it, held until it is switched back on.
    is_active = models.BooleanField(default=True)
    disabled_reason = models.CharField(max_length=200, blank=True, default="")
    #: Its client (or staff) asked to delete it and the delete has not finished yet (a ``409
    #: endpoint_busy``): no new events are written for it, so the delete made again completes.
    #: Always switched off too.
    deleting = models.BooleanField(default=False)
    #: The ``Idempotency-Key`` it was registered with ("" without one), and the fingerprint of
    #: that request's body: a retry with the key gets this endpoint back instead of a second one.
    #: Defaults in the database too, so code from before them still inserts during a deploy.
    idempotency_key = models.CharField(max_length=255, blank=True, default="", db_default="")
    request_fingerprint = models.CharField(max_length=64, blank=True, default="", db_default="")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["owner", "is_active"], name="webhook_endpoint_owner_idx")]
        constraints = [
            models.UniqueConstraint(
                fields=["owner", "idempotency_key"],
                condition=~models.Q(idempotency_key=""),
                name="webhook_endpoint_owner_key_uniq",
            )
        ]

    def __str__(self) -> str:
        return self.url

    def signing_secrets(self, now: datetime) -> list[str]:
        """The secrets a delivery is signed with now: the current one, plus each one a
        rotation replaced while its grace period lasts."""
        return [self.secret, *(p["secret"] for p in self.secrets_in_grace(now))]

    def secrets_in_grace(self, now: datetime) -> list[dict[str, str]]:
        """The replaced secrets still in their grace period at ``now``, newest first."""
        return [p for p in self.previous_secrets if datetime.fromisoformat(p["expires_at"]) > now]


class Stream(models.Model):
    """The last sequence number given to an event about one subject (an order)."""

    subject = models.UUIDField(primary_key=True)
    last_sequence = models.PositiveBigIntegerField(default=0)

    def __str__(self) -> str:
        return f"{self.subject} at {self.last_sequence}"


class Event(models.Model):
    """One change a client may be told about; ``body`` is exactly what is POSTed."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="webhook_events"
    )
    type = models.CharField(max_length=40)
    #: What the event is about (the order id) and its place among that subject's events.
    subject = models.UUIDField()
    sequence = models.PositiveBigIntegerField()
    #: The JSON document sent, rendered once so every attempt signs the same bytes.
    body = models.TextField()
    created_at = models.DateTimeField()

    class Meta:
        ordering = ["created_at"]
        constraints = [
            models.UniqueConstraint(fields=["subject", "sequence"], name="webhook_event_seq"),
        ]
        indexes = [models.Index(fields=["created_at"], name="webhook_event_created_idx")]

    def __str__(self) -> str:
        return f"{self.type} #{self.sequence} of {self.subject}"


class DeliveryStatus(models.TextChoices):
    PENDING = "pending", "pending"
    DELIVERED = "delivered", "delivered"
    DEAD = "dead", "dead"


class Delivery(models.Model):
    """One event to one endpoint: retried until a 2xx, or dead after WEBHOOKS_RETRY_FOR."""

    id = models.BigAutoField(primary_key=True)
    event = models.ForeignKey(Event, on_delete=models.CASCADE, related_name="deliveries")
    # Indexed by webhook_delivery_ep_idx (endpoint, status, -id), which starts with it.
    endpoint = models.ForeignKey(
        Endpoint, on_delete=models.CASCADE, related_name="deliveries", db_index=False
    )
    #: Copied from the event: deliveries of one subject go out in sequence order.
    subject = models.UUIDField()
    sequence = models.PositiveBigIntegerField()
    status = models.CharField(
        max_length=10, choices=DeliveryStatus.choices, default=DeliveryStatus.PENDING
    )
    attempts = models.PositiveIntegerField(default=0)
    next_attempt_at = models.DateTimeField()
    #: Retries stop here and the delivery is dead: WEBHOOKS_RETRY_FOR after it was created,
    #: redelivered by staff or its endpoint was switched back on, whichever is latest (a
    #: delivery held back while its endpoint was off is not dead for having waited).
    retry_until = models.DateTimeField()
    #: Held while an attempt is in flight; an expired lease means its worker is gone.
    lease_until = models.DateTimeField(null=True, blank=True)
    last_status_code = models.PositiveSmallIntegerField(null=True, blank=True)
    last_error = models.CharField(max_length=ERROR_MAX, blank=True, default="")
    #: The first bytes of the last response body, never more (WEBHOOKS_RESPONSE_EXCERPT).
    response_excerpt = models.CharField(max_length=RESPONSE_EXCERPT_MAX, blank=True, default="")
    last_attempt_at = models.DateTimeField(null=True, blank=True)
    delivered_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-id"]
        verbose_name_plural = "deliveries"
        permissions = [("redeliver_delivery", "Can redeliver dead webhook deliveries")]
        indexes = [
            # The claim and the sweep: pending deliveries of an endpoint, oldest first.
            models.Index(
                fields=["endpoint", "next_attempt_at"],
                name="webhook_delivery_pending_idx",
                condition=Q(status="pending"),
            ),
            # The ops console: an endpoint's deliveries, newest first, by status.
            models.Index(fields=["endpoint", "status", "-id"], name="webhook_delivery_ep_idx"),
            models.Index(
                fields=["status"], name="webhook_delivery_dead_idx", condition=Q(status="dead")
            ),
        ]

    def __str__(self) -> str:
        return f"delivery {self.id} ({self.status})"
