"""Login lockouts go to the audit log.

django-axes signals ``user_locked_out`` when a user or address is locked, and again on every
attempt while it stays locked; the audit log gets one entry per lockout (repeats within the
cool-off are left to axes' own access log). Deleting a still-active lockout (the unlock commands
``axes_reset*``, or the ops console) is a ``login.unlocked`` entry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from axes.handlers.database import AxesDatabaseHandler
from axes.helpers import get_client_username
from axes.models import AccessAttempt
from axes.signals import user_locked_out
from django.conf import settings
from django.db.models import Sum
from django.db.models.signals import post_delete, pre_delete
from django.dispatch import receiver
from django.utils import timezone

from accounts.throttling import address_bucket
from audit.context import client_ip
from audit.models import AuditEntry
from audit.services import audit_record


def lockout_address(request: Any) -> str | None:
    """The address login failures are counted under: the client's, an IPv6 one by its /64
    network (``2001:db8:1:2::``), as the API's rate limits count it
    (:func:`accounts.throttling.address_bucket`, whose network is given here by its address,
    which axes' address column can hold).

    A /64 is the smallest network an IPv6 host is given, and its holder picks any of its 2^64
    addresses at will: counted per address, each new source address got five more password
    checks (a million PBKDF2 rounds each, for names that do not exist too), and the address
    lockout did not limit it at all. The audit log keeps the address itself.
    """
    address = client_ip(request)
    return address_bucket(address).split("/", 1)[0] if address else address


def locked(username: str, ip_address: str) -> dict[str, int]:
    """What is locked out now, of this user name and this address: ``{"user:NAME" or
    "ip:ADDRESS": failures}``.

    As django-axes counts (``AXES_LOCKOUT_PARAMETERS``: the user name, and apart from it the
    address): the failures within the cool-off summed over every attempt row of the name, and
    over every row of the address, whatever names were tried from it.
    """
    since = timezone.now() - settings.AXES_COOLOFF_TIME
    recent = AccessAttempt.objects.filter(attempt_time__gte=since)
    out = {}
    for target, lookup in (
        (f"user:{username}", {"username": username}),
        (f"ip:{ip_address}", {"ip_address": ip_address}),
    ):
        if not next(iter(lookup.values())):
            continue
        failures = recent.filter(**lookup).aggregate(n=Sum("failures_since_start"))["n"] or 0
        if failures >= settings.AXES_FAILURE_LIMIT:
            out[target] = failures
    return out


def _entry_target(targets: dict[str, int]) -> str:
    """The user name if it is among ``targets``, else the address."""
    return next((t for t in targets if t.startswith("user:")), next(iter(targets)))


@receiver(user_locked_out, dispatch_uid="accounts.audit_lockout")
def audit_lockout(sender: Any, request: Any, username: str, ip_address: str, **_kw: Any) -> None:
    """One entry per lockout, on the user name if that is what is locked, else on the address
    (a right password from a locked address is refused too: its entry names the address, not
    the user, who never failed)."""
    targets = locked(username, ip_address)
    if not targets:  # axes counted otherwise (a changed setting): say what it said
        targets = {
            f"user:{username}" if username else f"ip:{ip_address}": settings.AXES_FAILURE_LIMIT
        }
    target = _entry_target(targets)
    since = timezone.now() - settings.AXES_COOLOFF_TIME
    if AuditEntry.objects.filter(action="login.locked_out", target=target, at__gte=since).exists():
        return
    audit_record(
        "login.locked_out",
        actor_name=username or "anonymous",
        target=target,
        detail={
            "failures": targets[target],
            "locked": sorted(targets),
            "path": request.path if request else "",
        },
        request=request,
        source="login",
    )


# What one delete of attempt rows saw, kept on its ``origin`` (the queryset or instance whose
# delete() runs): Django sends every pre_delete of one delete before any row goes and every
# post_delete after they all went. Dropped once its last row's post_delete ran, so an origin
# deleted through again starts afresh; what it lifted stays for the ops console to read.
_STATE = "_sagarunner_lockout_delete"
LIFTED = "_sagarunner_lockout_lifted"

Pair = tuple[str, str]


@dataclass
class _Delete:
    rows: int = 0  # rows whose post_delete is still to come
    before: dict[Pair, dict[str, int]] = field(default_factory=dict)
    recorded: set[str] = field(default_factory=set)


def attempt_pair(attempt: AccessAttempt) -> Pair:
    """The user name and address an attempt row counts for."""
    return (attempt.username or "", attempt.ip_address or "")


def lifted_by(origin: Any) -> set[Pair]:
    """The ``(user name, address)`` pairs whose rows, deleted through ``origin``, lifted a
    lockout (each recorded as ``login.unlocked``)."""
    return origin.__dict__.get(LIFTED, set())


@receiver(pre_delete, sender=AccessAttempt, dispatch_uid="accounts.audit_unlock_before")
def _note_locked(sender: type, instance: AccessAttempt, origin: Any = None, **_kw: Any) -> None:
    if origin is None:
        return
    state = origin.__dict__.setdefault(_STATE, _Delete())
    state.rows += 1
    # django-axes deletes expired attempts on every login and logout: such a row counts for
    # no lockout, so its going unlocks nothing, and it costs no query.
    if instance.attempt_time <= timezone.now() - settings.AXES_COOLOFF_TIME:
        return
    pair = attempt_pair(instance)
    if pair not in state.before:  # one look per user name and address, however many rows
        state.before[pair] = locked(*pair)


@receiver(post_delete, sender=AccessAttempt, dispatch_uid="accounts.audit_unlock")
def audit_unlock(sender: type, instance: AccessAttempt, origin: Any = None, **_kw: Any) -> None:
    """A lockout lifted by deleting attempts (the ``axes_reset*`` commands, the ops console):
    one ``login.unlocked`` entry per user name and address it lifted, naming both when one
    delete lifted both."""
    state: _Delete | None = origin.__dict__.get(_STATE) if origin is not None else None
    if state is None:
        return
    state.rows -= 1
    if state.rows <= 0:
        del origin.__dict__[_STATE]
    pair = attempt_pair(instance)
    before = state.before.pop(pair, {})
    mine = {t: n for t, n in before.items() if t not in state.recorded}
    if not mine:
        return  # an expired lockout, a few failures forgotten, or already recorded
    still = locked(*pair)
    unlocked = {t: n for t, n in mine.items() if t not in still}
    if not unlocked:
        return
    state.recorded.update(unlocked)
    origin.__dict__.setdefault(LIFTED, set()).add(pair)
    target = _entry_target(unlocked)
    audit_record(
        "login.unlocked",
        target=target,
        detail={
            "unlocked": sorted(unlocked),
            "failures": unlocked[target],
            "locked_address": instance.ip_address,
        },
    )


class OwnAttemptsOnlyHandler(AxesDatabaseHandler):
    """django-axes' database handler, except that a successful login clears only the failures
    recorded under the user name that logged in.

    axes clears every attempt matching any lockout parameter, the address included, so a
    success under one name also wiped the failures other names had from that address: a staff
    member could guess a colleague's password four times, log in as themself, and guess four
    more, never locked out. The address's count of other names' failures now stands.
    """

    def reset_user_attempts(self, request: Any, credentials: dict | None = None) -> int:
        username = get_client_username(request, credentials)
        if not username:
            return 0
        count, _ = AccessAttempt.objects.filter(username=username).delete()
        return count
