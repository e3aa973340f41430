"""The benchmark's saga type: five steps, each one small database write.

``saga_bench`` compares it with a plain Celery ``chain`` of five tasks doing the same writes, so
the difference is the engine's own cost (claims, records, timeline) against broker hops.

Importing this module registers ``bench5``. Production never imports it (it is not in the
default ``SAGA_DEFINITION_MODULES``), so the ops console does not offer a benchmark type; the
benchmark imports it in its own process and names it in the workers' environment
(:func:`worker_env`).
"""

from __future__ import annotations

from celery import shared_task
from django.db import connection

from lab import order_chain  # noqa: F401 - registers the order chain's tasks in bench workers
from sagas.public import SagaDefinition, Step, StepContext, register

TABLE = "saga_bench_writes"


def ensure_table() -> None:
    """The bench writes to a table of its own, created on demand (not part of the schema)."""
    with connection.cursor() as cursor:
        cursor.execute(
            f"CREATE TABLE IF NOT EXISTS {TABLE} (run varchar(64) NOT NULL, n integer NOT NULL,"
            " step smallint NOT NULL, at timestamptz NOT NULL DEFAULT clock_timestamp(),"
            " PRIMARY KEY (run, n, step))"
        )


def write(run: str, n: int, step: int) -> None:
    """One small idempotent write, shared with the plain-chain baseline."""
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {TABLE} (run, n, step) VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
            [run, n, step],
        )


def _step(number: int):
    def action(ctx: StepContext) -> dict:
        write(ctx.data["run"], ctx.data["n"], number)
        return {"w": number}

    action.__name__ = f"write_{number}"
    return action


def _undo(ctx: StepContext) -> None:
    return None


# Each step only writes to this database, through a commit of its own, as each link of the
# plain chain does: its claim need not wait for the disk (``stays_in_database``; a step that
# calls out would pay a flush per step, see docs/engine.md).
bench_saga = register(
    SagaDefinition(
        "bench5",
        steps=[
            Step(f"write_{i}", _step(i), compensate=_undo, stays_in_database=True)
            for i in range(1, 6)
        ],
    )
)
# The same saga with transactional steps: each write commits with its step's record.
bench_saga_tx = register(
    SagaDefinition(
        "bench5tx",
        steps=[
            Step(f"write_{i}", _step(i), compensate=_undo, transactional=True) for i in range(1, 6)
        ],
    )
)


def worker_env(environ: dict[str, str]) -> dict[str, str]:
    """``environ`` with this module added to ``SAGA_DEFINITION_MODULES``, for bench workers."""
    modules = [m for m in environ.get("SAGA_DEFINITION_MODULES", "").split(",") if m]
    if __name__ not in modules:
        modules.append(__name__)
    return {**environ, "SAGA_DEFINITION_MODULES": ",".join(modules)}


@shared_task(name="sagas.bench_chain_step", ignore_result=True, acks_late=True)
def chain_step(run: str, n: int, step: int) -> None:
    """The baseline: one link of a plain Celery ``chain`` doing the same write as a step."""
    write(run, n, step)
