"""The audit log: one row per security-relevant or operational action.

Append-only by convention (the ops console shows it read-only). The actor is kept twice: a
foreign key to follow while the user exists, and the user name as it was, so an entry still
says who acted after the account is deleted.
"""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.utils import timezone


class AuditEntry(models.Model):
    id = models.BigAutoField(primary_key=True)
    at = models.DateTimeField(default=timezone.now)
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
        db_index=False,
    )
    actor_name = models.CharField(
        max_length=150, help_text="The user name as it was, or who acted without one."
    )
    action = models.CharField(max_length=64, help_text="e.g. token.issued, login.locked_out.")
    target = models.CharField(
        max_length=200, blank=True, default="", help_text="What it was done to, e.g. user:alice."
    )
    detail = models.JSONField(default=dict, blank=True)
    ip = models.GenericIPAddressField(null=True, blank=True, help_text="Where it came from.")
    source = models.CharField(
        max_length=16, blank=True, default="", help_text="admin, api, cli or login."
    )

    class Meta:
        ordering = ["-at", "-id"]
        verbose_name = "audit entry"
        verbose_name_plural = "audit log"
        indexes = [
            models.Index(fields=["-at", "-id"], name="audit_at_idx"),
            models.Index(fields=["action", "-at"], name="audit_action_idx"),
            models.Index(fields=["actor_name", "-at"], name="audit_actor_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.at:%Y-%m-%d %H:%M:%S} {self.actor_name} {self.action} {self.target}"
