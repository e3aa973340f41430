"""Where the current action comes from: the request's client address and channel.

:class:`AuditContextMiddleware` notes them for the length of a request, so code deep below a
view (a service, a signal receiver) can write a complete audit entry without being handed the
request. Outside a request (a command, a worker) there is no address and the source is ``cli``
unless the caller says otherwise.
"""

from __future__ import annotations

import contextvars
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.http import HttpRequest, HttpResponse


@dataclass(frozen=True)
class Origin:
    ip: str | None
    source: str
    #: The request being served, for its user: an entry written with no actor, by code that
    #: reacts to what the user did (a lockout lifted by the rows they deleted), is theirs.
    request: HttpRequest | None = None

    def user(self) -> Any:
        """The request's signed-in user, or ``None`` (read only when an entry asks)."""
        user = getattr(self.request, "user", None)
        return user if user is not None and user.is_authenticated else None


_current: contextvars.ContextVar[Origin | None] = contextvars.ContextVar(
    "audit_origin", default=None
)


def client_ip(request: HttpRequest) -> str | None:
    """The client's address: ``REMOTE_ADDR``, or, behind ``TRUSTED_PROXY_COUNT`` proxies, the
    address the outermost trusted proxy saw (counted from the right of ``X-Forwarded-For``, so
    a client cannot choose it by sending its own header).

    A header with fewer hops than there are proxies did not come through all of them (a client
    reaching a nearer hop, or the app, directly): its leftmost hop, which that client wrote,
    was taken, so anyone could pick the address its rate limit and login lockout were counted
    by. Then, and for a hop that is no IP address (which the lockout's table cannot store), the
    peer's own address counts.
    """
    peer = request.META.get("REMOTE_ADDR") or None
    proxies = getattr(settings, "TRUSTED_PROXY_COUNT", 0)
    if proxies:
        forwarded = request.META.get("HTTP_X_FORWARDED_FOR", "")
        hops = [h.strip() for h in forwarded.split(",") if h.strip()]
        if len(hops) >= proxies:
            try:
                return str(ipaddress.ip_address(hops[-proxies]))
            except ValueError:
                return peer
    return peer


def source_of(request: HttpRequest) -> str:
    if request.path.startswith("/api/"):
        return "api"
    if request.path.startswith("/admin/"):
        return "admin"
    return "web"


def current_origin() -> Origin:
    return _current.get() or Origin(ip=None, source="cli")


class AuditContextMiddleware:
    """Notes the request's client address and channel for :func:`audit.services.audit_record`."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        token = _current.set(
            Origin(ip=client_ip(request), source=source_of(request), request=request)
        )
        try:
            return self.get_response(request)
        finally:
            _current.reset(token)
