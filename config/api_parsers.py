"""The API's request parser: JSON only, size-bounded, and never a 500 for an unreadable body.

Its own module because DRF imports the parser classes while defining ``APIView``: this must not
import anything that imports ``rest_framework.views``.
"""

from __future__ import annotations

import re
from typing import Any

from django.conf import settings
from rest_framework import exceptions, parsers, status
from rest_framework.utils import json


class PayloadTooLarge(exceptions.APIException):
    status_code = status.HTTP_413_REQUEST_ENTITY_TOO_LARGE
    default_code = "payload_too_large"
    default_detail = "The request body is too large."


class UnstorableText(exceptions.ParseError):
    """A string in the body that no text column can hold (see :func:`refuse_unstorable`)."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.fields = {path: [problem]}


# What JSON can spell but UTF-8 and PostgreSQL cannot hold: lone UTF-16 surrogates ("\ud800")
# and NUL ("\u0000"). Raw bytes never get this far (strict UTF-8 decoding refuses them).
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def refuse_unstorable(data: Any) -> None:
    """Raise :class:`UnstorableText` for the first string, key or value, holding a lone
    surrogate or a NUL, naming its place in the body (``items[0].sku``).

    Checked once, for every route, when the body is read: such a string cannot be encoded to
    reach the database, stored in ``text`` or ``jsonb``, hashed for an idempotency key or even
    echoed in an error message, so each field would otherwise fail with a 500 of its own.
    """
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            found = _UNSTORABLE.search(value)
            if found:
                raise UnstorableText(path or "body", _problem(found.group()))
        elif isinstance(value, dict):
            for key, item in value.items():
                found = _UNSTORABLE.search(key)
                if found:
                    raise UnstorableText(path or "body", f"a key holds {_problem(found.group())}")
                stack.append((f"{path}.{key}" if path else key, item))
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", item) for i, item in enumerate(value))


def _problem(char: str) -> str:
    what = "a NUL character" if char == "\x00" else "a lone UTF-16 surrogate"
    return f"{what} (\\u{ord(char):04x}), which text cannot hold."


class JSONParser(parsers.JSONParser):
    """DRF's JSON parser, plus: a body larger than ``DATA_UPLOAD_MAX_MEMORY_SIZE`` is a ``413``;
    an unknown charset, invalid UTF-8, absurdly deep nesting or a string no text column can
    hold is a ``400``, not a ``500``."""

    def parse(self, stream, media_type=None, parser_context=None) -> Any:
        parser_context = parser_context or {}
        # DRF 3.18.3 has get_encoding (it refuses bytes-to-bytes codecs); stubs 3.18.1 lack it.
        encoding = parsers.get_encoding(parser_context)  # type: ignore[attr-defined]
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        raw = stream.read(limit + 1) if limit is not None else stream.read()
        if limit is not None and len(raw) > limit:
            raise PayloadTooLarge()
        try:
            text = raw.decode(encoding)
            parse_constant = json.strict_constant if self.strict else None
            data = json.loads(text, parse_constant=parse_constant)
        except (ValueError, LookupError, RecursionError) as exc:
            raise exceptions.ParseError(f"JSON parse error - {exc}") from None
        refuse_unstorable(data)
        return data
