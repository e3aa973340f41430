"""The API's request parser: JSON only, size-bounded, and never a 500 for an unreadable body.

Its own module because DRF imports the parser classes while defining ``APIView``: this must not
import anything that imports ``rest_framework.views``.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from rest_framework import exceptions, parsers, status
from rest_framework.utils import json

from config.text import MAX_DEPTH, deeper_than, unstorable_text


class PayloadTooLarge(exceptions.APIException):
    status_code = status.HTTP_413_REQUEST_ENTITY_TOO_LARGE
    default_code = "payload_too_large"
    default_detail = "The request body is too large."


class UnstorableText(exceptions.ParseError):
    """A string in the body that no text column can hold (see :mod:`config.text`)."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.fields = {path: [problem]}


#: Digits an integer in a body may have: Python's own default limit on converting one, which
#: would otherwise refuse it with a message about ``sys.set_int_max_str_digits``.
MAX_INT_DIGITS = 4300


def parse_int(text: str) -> int:
    """``json.loads``' ``parse_int`` for text from outside: refuses an integer over
    :data:`MAX_INT_DIGITS` digits in the body's own terms."""
    if len(text) - text.startswith("-") > MAX_INT_DIGITS:
        raise ValueError(f"a number has more than {MAX_INT_DIGITS} digits")
    return int(text)


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads``' ``object_pairs_hook``: an object naming a key twice is refused.

    JSON leaves it open which one counts; Python keeps the last, and a proxy or a log that
    reads the first would see another request than the one carried out.
    """
    data = dict(pairs)
    if len(data) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"the key {key[:100]!r} appears twice in one object")
            seen.add(key)
    return data


class JSONParser(parsers.JSONParser):
    """DRF's JSON parser, plus: a body larger than ``DATA_UPLOAD_MAX_MEMORY_SIZE`` is a ``413``;
    an unknown charset, invalid UTF-8, absurdly deep nesting, a key twice in one object or a
    string no text column can hold is a ``400``, not a ``500``."""

    def parse(self, stream, media_type=None, parser_context=None) -> Any:
        parser_context = parser_context or {}
        # DRF 3.18.3 has get_encoding (it refuses bytes-to-bytes codecs); stubs 3.18.1 lack it,
        # 3.18.2 have it: the ignore holds for either.
        encoding = parsers.get_encoding(parser_context)  # type: ignore[attr-defined, unused-ignore]
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        raw = stream.read(limit + 1) if limit is not None else stream.read()
        if limit is not None and len(raw) > limit:
            raise PayloadTooLarge()
        try:
            text = raw.decode(encoding)
            parse_constant = json.strict_constant if self.strict else None
            data = json.loads(
                text,
                parse_constant=parse_constant,
                parse_int=parse_int,
                object_pairs_hook=unique_keys,
            )
        except RecursionError:
            data = None
            too_deep = True
        except (ValueError, LookupError) as exc:
            raise exceptions.ParseError(f"JSON parse error - {exc}") from None
        else:
            too_deep = deeper_than(data, MAX_DEPTH)
        if too_deep:
            raise exceptions.ParseError(
                f"JSON parse error - the body is nested too deeply (at most {MAX_DEPTH} levels)"
            )
        # Once here, for every route: such a string would otherwise fail with a 500 wherever
        # it went (a query, a jsonb column, an idempotency fingerprint, an error message).
        found = unstorable_text(data)
        if found is not None:
            raise UnstorableText(*found)
        return data
