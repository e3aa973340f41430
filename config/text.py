"""Text PostgreSQL cannot hold, found before it reaches a query.

JSON can spell a lone UTF-16 surrogate (``"\\ud800"``) and a NUL (``"\\u0000"``); a surrogate
cannot even be encoded as UTF-8 (so it cannot be sent in a query, hashed or echoed in a
response), and a NUL cannot be stored in ``text`` or ``jsonb``. Nor can ``jsonb`` hold a
number that is not finite: ``1e400`` parses to infinity, and Python's ``json`` also reads
``NaN`` and ``Infinity``. Whatever accepts JSON from outside (the API's parser, the ops
console's signal form) asks here first.
"""

from __future__ import annotations

import math
import re
import unicodedata
from typing import Any

_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


#: Levels of nesting a body may have. Nothing the API takes needs more than a few; a signal's
#: free-form payload was the one place a deep one got through, and ~900 levels (well inside
#: the parser's own reach) overflowed the stack later, in the database driver's JSON encoder
#: (a 500). A fixed limit, checked without recursion, does not depend on how deep the stack
#: happens to be where the body is used.
MAX_DEPTH = 64


def deeper_than(data: Any, limit: int) -> bool:
    """Whether ``data`` nests objects and arrays more than ``limit`` levels deep."""
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict | list):
            if depth > limit:
                return True
            children = value.values() if isinstance(value, dict) else value
            stack.extend((child, depth + 1) for child in children)
    return False


def unstorable_text(data: Any) -> tuple[str, str] | None:
    """``(place, problem)`` for the first string or key in ``data`` that text cannot hold, in
    document order (a mapping's keys before its values), or ``None``.

    ``place`` is an input path (``items[0].sku``; ``body`` for the top level). Iterative, so
    any depth ``json.loads`` produced is walked without recursion.
    """
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            found = _UNSTORABLE.search(value)
            if found:
                return path or "body", _problem(found.group())
        elif isinstance(value, dict):
            children = []
            for key, item in value.items():
                found = _UNSTORABLE.search(key) if isinstance(key, str) else None
                if found:
                    return path or "body", f"a key holds {_problem(found.group())}"
                children.append((f"{path}.{key}" if path else str(key), item))
            stack.extend(reversed(children))
        elif isinstance(value, float) and not math.isfinite(value):
            return path or "body", "a number JSON cannot hold (too large, NaN or Infinity)"
        elif isinstance(value, list | tuple):
            stack.extend(reversed([(f"{path}[{i}]", item) for i, item in enumerate(value)]))
    return None


def header_text(request: Any, name: str) -> str | None:
    """A request header as the client wrote it, in UTF-8; ``None`` when absent.

    WSGI hands header values over as Latin-1 (PEP 3333), so a UTF-8 value arrived as two or
    three characters per letter: a 240-letter Cyrillic key counted as 480 against a limit of
    255. A value that is not UTF-8 is kept as Latin-1 read it.
    """
    value = request.headers.get(name)
    return None if value is None else latin1_as_utf8(value)


def latin1_as_utf8(value: str) -> str:
    """``value`` read again as UTF-8, if it is UTF-8 that was read as Latin-1; else as it is.

    (The data migrations that rewrote the idempotency keys kept before the header was read
    this way carry their own copy.)
    """
    if value.isascii():
        return value
    try:
        return value.encode("latin-1").decode("utf-8")
    except UnicodeError:  # not Latin-1 (typed in the ops console), or not UTF-8 bytes
        return value


_UNSEEN = ("Cc", "Cf", "Zs", "Zl", "Zp")


def trimmed(text: str) -> str:
    """``text`` without what cannot be seen at either end: ``str.strip`` leaves a zero-width
    space or a byte-order mark, so a required note made of one passed for written."""
    start, end = 0, len(text)
    while start < end and unicodedata.category(text[start]) in _UNSEEN:
        start += 1
    while end > start and unicodedata.category(text[end - 1]) in _UNSEEN:
        end -= 1
    return text[start:end]


def has_control_characters(text: str) -> bool:
    """Whether ``text`` holds an ASCII control character (NUL included): refused in a header
    value the database keeps, such as an Idempotency-Key."""
    return any(ord(c) < 0x20 or ord(c) == 0x7F for c in text)


def _problem(char: str) -> str:
    what = "a NUL character" if char == "\x00" else "a lone UTF-16 surrogate"
    return f"{what} (\\u{ord(char):04x}), which text cannot hold."
