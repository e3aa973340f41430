"""API tokens: django-rest-knox stores only a SHA-512 digest of each token and its expiry.

A token is shown once, when it is issued (``manage.py issue_token``); it cannot be read back.
A user may hold several: issuing a new one leaves the others valid until they expire or are
revoked, so a client can rotate without downtime. Every issue and revocation is in the audit
log.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone
from knox.auth import TokenAuthentication as KnoxTokenAuthentication
from knox.models import AuthToken
from rest_framework import authentication, exceptions
from rest_framework.request import Request

from accounts.throttling import charge_anonymous, charge_user
from audit.services import audit_record

#: How a demo token's key starts (``issue_token --demo``, the token ``make run`` prints). knox's
#: own tokens, and those migrated from DRF's, are hexadecimal, so no token issued another way
#: starts with it: a demo token is told apart by its stored key alone.
DEMO_TOKEN_PREFIX = "demo_"

#: An authentication scheme's name as it may be quoted back (``Bearer``, ``Basic``, ``JWT``).
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9-]{0,19}")


def token_label(token: AuthToken) -> str:
    """How an entry names a token without revealing it: its lookup prefix (stored in clear by
    knox to find the row; useless without the rest of the token)."""
    return token.token_key[:8]


def token_issue(
    *,
    user: Any,
    expires_days: int | None = None,
    actor: Any = None,
    actor_name: str = "",
    prefix: str = "",
) -> tuple[AuthToken, str]:
    """A new token for ``user``, valid ``expires_days`` (default ``API_TOKEN_TTL_DAYS``).

    Returns the stored row and the token itself, which exists nowhere else: hand it over now.
    ``prefix`` starts the token, and so its stored key (:data:`DEMO_TOKEN_PREFIX`).
    """
    days = settings.API_TOKEN_TTL_DAYS if expires_days is None else expires_days
    with transaction.atomic():
        instance, token = AuthToken.objects.create(
            user=user, expiry=timedelta(days=days), prefix=prefix
        )
        # Expired tokens of this user are dead weight: remove them while we are here.
        AuthToken.objects.filter(user=user, expiry__lt=timezone.now()).delete()
        audit_record(
            "token.issued",
            actor=actor,
            actor_name=actor_name,
            target=f"user:{user.get_username()}",
            detail={"token": token_label(instance), "expiry": instance.expiry.isoformat()},
        )
    return instance, token


def token_revoke(*, token: AuthToken, actor: Any, reason: str = "", actor_name: str = "") -> None:
    """Revoke ``token`` at once (its owner's other tokens stay valid)."""
    with transaction.atomic():
        AuthToken.objects.filter(pk=token.pk).delete()
        audit_record(
            "token.revoked",
            actor=actor,
            actor_name=actor_name,
            target=f"user:{token.user.get_username()}",
            detail={"token": token_label(token), "reason": reason},
        )


def demo_token_issue(
    *, user: Any, expires_days: int | None = None, actor_name: str = ""
) -> tuple[AuthToken, str, int]:
    """A new demo token for ``user``, revoking the demo tokens issued before it.

    ``make run`` prints one each time it starts. A token cannot be shown again, so each run's
    is a new one, and without this every run left another live one behind for its whole
    lifetime. The user's other tokens (``issue_token`` without ``--demo``, whose keys carry no
    :data:`DEMO_TOKEN_PREFIX`) are not touched. The user's row is locked first, so two runs at
    once still leave exactly one demo token.

    Returns the row, the token and how many earlier demo tokens were revoked: a client may
    still be using one (another ``make run`` on the same database), so the caller says so.
    """
    with transaction.atomic():
        type(user).objects.select_for_update().get(pk=user.pk)
        earlier = list(
            AuthToken.objects.filter(
                user=user, token_key__startswith=DEMO_TOKEN_PREFIX
            ).select_related("user")
        )
        for token in earlier:
            token_revoke(
                token=token,
                actor=None,
                actor_name=actor_name,
                reason="replaced by a new demo token",
            )
        instance, token = token_issue(
            user=user, expires_days=expires_days, actor_name=actor_name, prefix=DEMO_TOKEN_PREFIX
        )
    return instance, token, len(earlier)


class TokenAuthentication(KnoxTokenAuthentication):
    """``Authorization: Token <token>`` against knox's hashed tokens.

    knox looks at every other token of the user on each request to delete expired ones (one
    more query per request); here only the presented token is checked, and expired tokens are
    removed when presented and when the user gets a new one (staff see the rest, marked
    expired, in the ops console).
    """

    def authenticate(self, request: Request):
        try:
            authenticated = super().authenticate(request)
        except exceptions.AuthenticationFailed:
            # A wrong or expired token counts against the address's anonymous limit: past it,
            # a wrong token gets a 429 instead of a 401. The token is still looked up first,
            # so a right one from that address still works: the limit slows nothing that
            # could find a 256-bit token, and locking an address out of its own valid tokens
            # would let anyone behind the same NAT do that to everyone else.
            charge_anonymous(request)
            raise
        if authenticated is not None:
            charge_user(request, authenticated[0])  # before permissions: a 403 counts too
        return authenticated

    def not_authenticated_detail(self, request: Request) -> str | None:
        """Why a request that sent an ``Authorization`` header is still anonymous: its scheme
        is not ``Token`` (``Bearer``, the commonest, or a bare key), so this class passed it
        by, and the ``401`` said no credentials were provided, which the client knew to be
        false. ``None`` without such a header: DRF's words are right then. The scheme is
        quoted only when it looks like one, so a bare key is not echoed back."""
        header = authentication.get_authorization_header(request).split()
        if not header:
            return None
        expected = self.authenticate_header(request)
        scheme = header[0].decode("latin-1")
        if scheme.lower() == expected.lower():
            return None
        use = f"send the token as 'Authorization: {expected} <token>'."
        if len(header) > 1 and _SCHEME.fullmatch(scheme):
            return f"This API does not take 'Authorization: {scheme} ...'; {use}"
        return f"The Authorization header has no scheme this API takes; {use}"

    def authenticate_credentials(self, token: bytes):
        # Tokens are printable ASCII. knox decodes whatever came as UTF-8 (a 500 on other
        # bytes) and looks its prefix up (a 500 on a NUL): refuse anything else as a wrong
        # token, before either.
        if not (token.isascii() and token.decode("ascii").isprintable()):
            raise exceptions.AuthenticationFailed("Invalid token.")
        return super().authenticate_credentials(token)

    def _cleanup_token(self, auth_token: AuthToken) -> bool:
        if auth_token.expiry is not None and auth_token.expiry < timezone.now():
            auth_token.delete()
            return True
        return False


class SessionAuthentication(authentication.SessionAuthentication):
    """DRF's session authentication (the browsable API after an ops console login), whose user
    is charged ``API_RATE_LIMIT`` like a token's, before permissions are checked."""

    def authenticate(self, request: Request):
        authenticated = super().authenticate(request)
        if authenticated is not None:
            charge_user(request, authenticated[0])
        return authenticated


class AnonymousRateLimit(authentication.BaseAuthentication):
    """Last in the authentication classes: reached only by a request no earlier class
    authenticated, it charges the client address's anonymous limit and authenticates nobody.
    (DRF checks permissions before throttles, so a throttle class would never see the
    anonymous requests that end in ``401``; the classes before it charge their user's limit
    for the same reason.)"""

    def authenticate(self, request: Request) -> None:
        charge_anonymous(request)
        return None
