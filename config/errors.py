"""The application's errors: what an app raises on purpose, and what a client is told.

Every app's deliberate errors derive from :class:`AppError` (an order that is not valid, a
saga operation that makes no sense now, an idempotency key misused, a participant's business
"no"). Each carries a machine-readable ``code``, a ``detail`` for people and optionally
``fields`` (input path -> messages); its class says which HTTP status it is. One handler
(:func:`config.api_errors.exception_handler`) turns any of them into ``{code, detail, fields}``
without knowing the apps. No imports of the project: every app may depend on this module.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping


class AppError(Exception):
    """Base of every error an app raises on purpose."""

    #: The HTTP status a client gets for it.
    http_status = 400
    code = "invalid"
    detail = ""
    fields: dict[str, list[str]] | None = None
    #: Extra response headers (e.g. ``Retry-After``).
    headers: dict[str, str] = {}

    def status_for_client(self) -> int:
        return self.http_status


# ---------------------------------------------------------------------------------------------
# Names a request body may not carry
# ---------------------------------------------------------------------------------------------
#: A name the object does not take at all (a ``coupon``, an item's ``price``).
UNKNOWN_FIELD = "unknown_field"
#: A name the API answers with but sets itself (an endpoint's ``secret``, an order's
#: ``total``, a product's ``sku`` once it exists).
READ_ONLY_FIELD = "read_only_field"
READ_ONLY_MESSAGE = "Read-only: the server sets this field; it cannot be sent."
#: The most names one object's refusal lists. A body of 20,000 made-up names (the 2.5 MB a
#: request may carry) was answered with 20,000 errors, a 1.4 MB body built by the web
#: process; the first few tell a client what to mend as well as all of them do.
MAX_REFUSED_NAMES = 20


def refused_fields(
    names: Iterable[str],
    *,
    takes: Collection[str],
    what: str,
    read_only: Mapping[str, str] | Collection[str] = (),
) -> list[tuple[str, str, str]]:
    """``(name, code, message)`` for each of ``names`` (the keys of a body's object, in the
    order sent) that the object does not take: ``read_only_field`` for one of ``read_only``
    (names, or name -> message; ``""`` for :data:`READ_ONLY_MESSAGE`), else ``unknown_field``.

    Every API refuses such a name instead of ignoring it: a client that sent a ``coupon``, an
    item's ``price`` or a webhook ``secret`` of its own would otherwise believe it took effect.
    ``what`` names the object in the message ("an order", "an item"). At most
    :data:`MAX_REFUSED_NAMES` are listed, the first ones sent.
    """
    refused: list[tuple[str, str, str]] = []
    for name in names:
        if name in takes:
            continue
        if len(refused) == MAX_REFUSED_NAMES:
            break
        if name in read_only:
            why = read_only[name] if isinstance(read_only, Mapping) else ""
            refused.append((name, READ_ONLY_FIELD, why or READ_ONLY_MESSAGE))
        else:
            refused.append((name, UNKNOWN_FIELD, f"Unknown field: {what} takes {_listed(takes)}."))
    return refused


def _listed(names: Collection[str]) -> str:
    """``"a, b and c"``; ``"nothing"`` for none."""
    listed = list(names)
    if not listed:
        return "nothing"
    return listed[0] if len(listed) == 1 else f"{', '.join(listed[:-1])} and {listed[-1]}"
