"""The environment, read strictly: a number or a switch that does not read as one stops start-up.

django-environ's own casts are forgiving in the wrong way for settings. Its ``float`` keeps only
digits, ``,``, ``.`` and ``-`` before converting, so ``SAGA_DEADLINE=10m`` read as ten *seconds*
and ``SAGA_BACKOFF_BASE=0,5`` as 0.5; its ``bool`` reads anything but a known "yes" as no, so
``SAGA_PROVIDER_BREAKERS=maybe`` turned the breakers off without a word; and a bad ``int`` ended
start-up with a traceback that never named the variable. Here each of them either reads the
whole value or raises ``ImproperlyConfigured`` naming the variable and what it must be (which
``manage.py`` prints as one line). An empty number or switch counts as unset, as a compose
file's ``NAME=`` means.
"""

from __future__ import annotations

import math
from typing import Any

import environ
from django.core.exceptions import ImproperlyConfigured

TRUE = frozenset({"1", "true", "yes", "y", "on", "ok"})
FALSE = frozenset({"0", "false", "no", "n", "off"})


class StrictEnv(environ.Env):
    """``environ.Env`` whose ``int``, ``float`` and ``bool`` refuse what they cannot read whole."""

    def is_set(self, var: str) -> bool:
        """Whether the variable holds a value (empty counts as unset, as everywhere here)."""
        return self._raw(var) is not None

    def _raw(self, var: str) -> str | None:
        value = self.ENVIRON.get(var)
        if value is None or not value.strip():
            return None
        return value.strip()

    def int(
        self, var: str, default: Any = environ.Env.NOTSET, *, minimum: int | None = None
    ) -> Any:
        """A whole number; ``minimum``: the least it may be (a count of attempts, a batch)."""
        raw = self._raw(var)
        if raw is None:
            return self._default(var, default)
        try:
            value = int(raw)
        except ValueError:
            raise ImproperlyConfigured(f"{var} must be a whole number, not {raw!r}") from None
        if minimum is not None and value < minimum:
            raise ImproperlyConfigured(f"{var} must be at least {minimum}, not {raw!r}")
        return value

    def float(
        self,
        var: str,
        default: Any = environ.Env.NOTSET,
        *,
        positive: bool = False,
        minimum: float | None = None,
    ) -> Any:
        """A number; ``positive``: above zero (a duration that must pass), ``minimum``: at least
        that (``0`` for one that may be off)."""
        raw = self._raw(var)
        if raw is None:
            return self._default(var, default)
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise ImproperlyConfigured(
                f"{var} must be a number (a '.' before any decimals, no unit), not {raw!r}"
            )
        if positive and value <= 0:
            raise ImproperlyConfigured(f"{var} must be a number above 0, not {raw!r}")
        if minimum is not None and value < minimum:
            raise ImproperlyConfigured(f"{var} must be at least {minimum:g}, not {raw!r}")
        return value

    def bool(self, var: str, default: Any = environ.Env.NOTSET) -> Any:
        raw = self._raw(var)
        if raw is None:
            return self._default(var, default)
        if raw.lower() in TRUE:
            return True
        if raw.lower() in FALSE:
            return False
        raise ImproperlyConfigured(
            f"{var} must be on or off (1, true, yes, on, ok / 0, false, no, off), not {raw!r}"
        )

    def _default(self, var: str, default: Any) -> Any:
        if default is environ.Env.NOTSET:
            raise ImproperlyConfigured(f"Set the {var} environment variable")
        return default


def redis_url_problem(url: str) -> str | None:
    """What is wrong with a ``redis://`` URL's options, or ``None``: the client's own reading
    of it, without connecting (building a connection object does not open a socket). An
    option the client does not know (``?a=1``) or cannot read (``?socket_timeout=abc``) got
    past start-up and failed every request that used the cache, each a 500."""
    import redis

    try:
        redis.ConnectionPool.from_url(url).make_connection()
    except (TypeError, ValueError) as exc:
        return str(exc)
    return None


def refuse_bad_redis_url(var: str, url: str) -> None:
    """Stop start-up, naming ``var``, if the Redis client refuses ``url``'s options."""
    if problem := redis_url_problem(url):
        raise ImproperlyConfigured(f"{var} has an option the Redis client refuses: {problem}")
