"""The engine's own statements are prepared once per connection, and sent as text where the
text is wanted (setting off, queries logged, a traced cursor class).

The saga runs in this process (``advance``), out of the doorbell's reach, so the statements run
on this test's connection and ``pg_prepared_statements`` (which only shows one's own session)
can say what was prepared and how often each was run.
"""

from __future__ import annotations

import pytest
from django.db import connection, transaction
from django.db.backends.postgresql.base import Cursor as DjangoCursor
from django.test.utils import CaptureQueriesContext

from sagas.models import Saga, SagaEvent, SagaState, SagaStep
from sagas.runner import advance
from sagas.services import saga_start
from tests.sagas.inprocess import out_of_workers_reach
from tests.sagas.sagatypes import ensure_effects_table

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True)]


@pytest.fixture(autouse=True)
def _fresh_connection(transactional_db, settings):
    ensure_effects_table()
    settings.SAGA_INLINE_BUDGET = 60.0  # all five steps in one advance()
    connection.close()  # a session of its own: no statement prepared by an earlier test
    yield
    connection.close()


def _run_one_saga() -> Saga:
    with transaction.atomic():
        saga = saga_start(saga_type="test5", data={"script": {}})
        out_of_workers_reach(saga.pk)
    advance(saga.id, 1000)
    saga = Saga.objects.get(pk=saga.pk)
    assert saga.state == SagaState.SUCCEEDED
    return saga


def _prepared() -> list[tuple[str, int]]:
    """``(statement, times planned or run from its plan)`` of this session's saga statements."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT statement, generic_plans + custom_plans FROM pg_prepared_statements"
            " WHERE statement LIKE '%%\"sagas_saga\"%%'"
        )
        return cursor.fetchall()


def test_the_start_claim_and_records_are_prepared_and_reused():
    saga = _run_one_saga()
    prepared = _prepared()
    texts = [s for s, _ in prepared]
    # The start: saga, five step rows and the first event, one statement.
    starts = [s for s in texts if s.startswith('WITH s AS (INSERT INTO "sagas_saga"')]
    assert len(starts) == 1, texts
    assert (
        'INSERT INTO "sagas_sagastep"' in starts[0] and 'INSERT INTO "sagas_sagaevent"' in starts[0]
    )
    # The claim (which counts an attempt, and decides whether its commit waits for the disk).
    assert any(
        "set_config('synchronous_commit'" in s and '"attempt" = "attempt" + 1' in s for s in texts
    )
    # Steps 1-4 record the same shape of statement: prepared once, run four times.
    assert max(n for s, n in prepared if 'UPDATE "sagas_sagastep"' in s) >= 4, prepared
    # What the one-statement start wrote is what the ORM wrote before it.
    steps = list(SagaStep.objects.filter(saga=saga).order_by("index").values_list("index", "name"))
    assert steps == [(i, f"s{i + 1}") for i in range(5)]
    started = SagaEvent.objects.get(saga=saga, kind="started")
    assert started.detail == "type test5 v1" and started.actor == "engine"


def test_off_sends_every_statement_as_text(settings):
    settings.SAGA_PREPARED_STATEMENTS = False
    _run_one_saga()
    assert _prepared() == []


def test_a_cursor_class_installed_by_someone_else_is_kept_unprepared():
    """OpenTelemetry's SQL tracing installs its own cursor class: the engine's statements go
    through it (and are traced), unprepared."""
    used: list[str] = []

    class Traced(DjangoCursor):
        def execute(self, query, params=None, **kwargs):
            used.append(str(query))
            return super().execute(query, params, **kwargs)

    connection.ensure_connection()
    connection.connection.cursor_factory = Traced
    _run_one_saga()
    assert _prepared() == []
    fenced = [q for q in used if '"version" = "version" + 1' in q]
    assert len(fenced) == 6  # the claim and five records


def test_logged_queries_show_the_whole_statement():
    """While Django logs queries (DEBUG, a test capturing them), the log has the SQL text."""
    with CaptureQueriesContext(connection) as captured:
        _run_one_saga()
    writes = [q["sql"] for q in captured if 'UPDATE "sagas_saga"' in q["sql"]]
    assert len(writes) >= 6 and all("'" in sql for sql in writes)  # values inlined
