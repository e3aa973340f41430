"""A value computed at most once per short window per process, one computation at a time.

For the open endpoints whose answer costs the database or the broker (``/healthz``, ``/metrics``):
a loop of requests then costs one computation per window, and requests arriving while one runs
take its answer instead of starting their own.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

T = TypeVar("T")


class Recent(Generic[T]):
    """The last value of ``compute`` for a ``key``, reused while younger than ``seconds()``."""

    def __init__(self, seconds: Callable[[], float]) -> None:
        self._seconds = seconds
        self._last: tuple[float, Hashable, T] | None = None
        self._computing = threading.Lock()

    def get(self, compute: Callable[[], T], key: Hashable = None) -> T:
        found = self._fresh(key)
        if found is not None:
            return found[0]
        with self._computing:
            found = self._fresh(key)  # another request computed it while this one waited
            if found is not None:
                return found[0]
            value = compute()
            self._last = (time.monotonic(), key, value)
            return value

    def forget(self) -> None:
        self._last = None

    def _fresh(self, key: Hashable) -> tuple[T] | None:
        last = self._last
        if last is not None and last[1] == key and time.monotonic() - last[0] < self._seconds():
            return (last[2],)
        return None
