"""The deploy check: code that lacks the definition of an unfinished saga is refused at start.

Registered as a Django system check (``manage.py check``, and so ``migrate``, ``runserver`` and
every management command), and run again when a Celery worker starts (Celery runs the system
checks but ignores their result; see ``config.celery``). It reads one small partial index: the
unfinished sagas (running, compensating, needs_manual) per type, definition version and
fingerprint.
"""

from __future__ import annotations

from typing import Any

import structlog
from django.core.checks import CheckMessage, Error, register
from django.db import DatabaseError, transaction

from sagas.definition import get_definition, registered_versions
from sagas.selectors import VersionCount, unsettled_versions

log = structlog.get_logger("sagas.checks")


def definition_problems(counts: list[VersionCount]) -> list[CheckMessage]:
    """The errors for ``counts`` against the definitions registered in this process."""
    errors: list[CheckMessage] = []
    for c in counts:
        versions = registered_versions(c.saga_type)
        what = f"{c.count} unfinished {c.saga_type!r} saga{'s' if c.count != 1 else ''}"
        if not versions:
            errors.append(
                Error(
                    f"{what} run on version {c.version} of a type this code does not "
                    "register at all.",
                    hint=(
                        f"Add the module that registers {c.saga_type!r} to "
                        "SAGA_DEFINITION_MODULES, and keep it there until those sagas have "
                        "finished: the workers run the running ones to their end; one that "
                        "needs attention waits for a person in the ops console."
                    ),
                    id="sagas.E001",
                )
            )
            continue
        if c.version not in versions:
            have = ", ".join(f"v{v}" for v in versions)
            errors.append(
                Error(
                    f"{what} run on version {c.version}, which this code does not register "
                    f"(registered: {have}).",
                    hint=(
                        f"Keep SagaDefinition({c.saga_type!r}, ..., version={c.version}) "
                        "registered until those sagas have finished, or move them first with "
                        f"`manage.py saga_migrate {c.saga_type} --from {c.version} --to N "
                        "--apply`."
                    ),
                    id="sagas.E001",
                )
            )
            continue
        definition = get_definition(c.saga_type, c.version)
        if c.fingerprint and c.fingerprint != definition.fingerprint:
            errors.append(
                Error(
                    f"{what} started on version {c.version} with shape {c.fingerprint}, but "
                    f"version {c.version} in this code has shape {definition.fingerprint}: "
                    "its steps, pivot or compensations changed without a version bump.",
                    hint=(
                        f"Restore version {c.version} as it was and register the change as a "
                        "new version beside it."
                    ),
                    id="sagas.E002",
                )
            )
    return errors


@register("sagas")
def check_saga_definitions(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """Fail when unfinished sagas run on a version this code lacks or has changed.

    Silent when there is nothing to read yet: a fresh database before ``migrate`` has no saga
    table, and a database that cannot be reached is the health check's business, not a reason
    to refuse ``migrate`` or ``check``.
    """
    try:
        # A savepoint, so a missing table does not spoil a transaction the caller has open.
        with transaction.atomic():
            counts = unsettled_versions()
    except DatabaseError as exc:
        log.debug("sagas.definition_check_skipped", error=repr(exc)[:300])
        return []
    return definition_problems(counts)
