"""Every query, not only the engine's, is bound on the server and prepared once it repeats:
the participants' statements (inventory's hold, the payment provider's ledger, the shipment)
run thousands of times per connection, and PostgreSQL should not parse and plan them anew.

The orders run in-process on this test's connection, so ``pg_prepared_statements`` (which
shows only one's own session) tells what was prepared and how often each plan was used.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from django.conf import settings as django_settings
from django.db import NotSupportedError, connection, connections, transaction

from tests.test_settings_and_launcher import REPO_ROOT, fresh_env

from .conftest import make_product
from .test_order_round_trips import (  # noqa: F401 (_in_process_only: a fixture)
    _in_process_only,
    _placed_for_this_process,
    _run_in_process,
)

pytestmark = pytest.mark.django_db(transaction=True)


def _prepared() -> dict[str, int]:
    """``{statement: times planned or run from its plan}`` of this session."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT statement, generic_plans + custom_plans FROM pg_prepared_statements")
        return dict(cursor.fetchall())


def test_the_participants_statements_are_prepared_once_they_repeat(customer):
    make_product("widget", stock=20)
    orders = _placed_for_this_process(customer, 7)
    connection.close()  # a session of its own: nothing prepared before this run
    for order in orders:
        _run_in_process(order)

    prepared = _prepared()
    texts = list(prepared)

    def runs_of(*needles: str) -> int:
        matching = [n for s, n in prepared.items() if all(x in s for x in needles)]
        assert matching, (needles, texts)
        return max(matching)

    # Bound on the server: the texts carry placeholders, not the values.
    assert all("$1" in s for s in texts if '"inventory_' in s or '"payments_' in s), texts
    # Seven orders: each statement below runs once per order, so from the fifth run on it is
    # planned from its prepared form.
    assert runs_of('INSERT INTO "payments_provideroperation"') >= 2
    assert runs_of('INSERT INTO "shipping_shipment"') >= 2
    assert runs_of('UPDATE "inventory_product"') >= 2
    assert runs_of('"payments_payment"') >= 2


def _options_of_a_fresh_process(env: dict[str, str]) -> str:
    """``server_side_binding`` and ``prepare_threshold`` as a new process's settings hold them."""
    printed = subprocess.run(
        [
            sys.executable,
            "-c",
            "import django; django.setup(); from django.conf import settings;"
            " o = settings.DATABASES['default']['OPTIONS'];"
            " print(repr(o.get('server_side_binding')), repr(o.get('prepare_threshold')))",
        ],
        cwd=REPO_ROOT,
        env={**env, "DJANGO_SETTINGS_MODULE": "config.settings"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert printed.returncode == 0, printed.stderr
    return printed.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize(("value", "bound_on_server"), [(None, True), ("1", True), ("0", False)])
def test_one_switch_turns_server_binding_and_preparing_on_and_off(value, bound_on_server):
    """``SAGA_PREPARED_STATEMENTS`` (on unless set to 0) governs Django's queries too: off is
    Django's own default (bound on the client, nothing prepared), for a pooler that cannot keep
    prepared statements."""
    env = fresh_env(SECRET_KEY="x", HTTPS_ONLY="0")
    env.pop("SAGA_PREPARED_STATEMENTS", None)
    if value is not None:
        env["SAGA_PREPARED_STATEMENTS"] = value
    expected = "True 5" if bound_on_server else "None None"
    assert _options_of_a_fresh_process(env) == expected


def test_a_database_url_keeps_its_own_choice_typed():
    env = fresh_env(SECRET_KEY="x", HTTPS_ONLY="0")
    env["DATABASE_URL"] = (
        "postgres://postgres@127.0.0.1:5432/x?server_side_binding=false&prepare_threshold=20"
    )
    assert _options_of_a_fresh_process(env) == "False 20"


def test_this_suite_runs_with_server_binding():
    """The whole suite exercises the default: every test's queries go out bound on the server."""
    assert django_settings.DATABASES["default"]["OPTIONS"]["server_side_binding"] is True
    connection.ensure_connection()
    assert connection.connection.prepare_threshold == 5


@pytest.fixture
def scratch_table():
    with connection.cursor() as cursor:
        cursor.execute("CREATE TABLE test_replan (id int PRIMARY KEY, name varchar(10))")
        cursor.execute("INSERT INTO test_replan VALUES (1, 'one')")
    yield
    connection.close()  # the prepared statements go with the session
    with connection.cursor() as cursor:
        cursor.execute("DROP TABLE IF EXISTS test_replan")


def _widen_the_column_elsewhere() -> None:
    """What a migration changing a column's type does, from another session."""
    other = connections.create_connection("default")
    try:
        with other.cursor() as cursor:
            cursor.execute("ALTER TABLE test_replan ALTER COLUMN name TYPE varchar(300)")
    finally:
        other.close()


def _read() -> tuple:
    with connection.cursor() as cursor:
        cursor.execute("SELECT id, name FROM test_replan WHERE id = %s", [1])
        return cursor.fetchone()


def test_a_column_type_changed_by_a_migration_does_not_break_a_prepared_query(scratch_table):
    """PostgreSQL refuses a prepared statement whose result changed type, on every run, until it
    is deallocated; on its own, the statement is run again on fresh statements."""
    for _ in range(6):
        assert _read() == (1, "one")  # prepared from the fifth run
    assert any("test_replan" in s for s in _prepared())
    _widen_the_column_elsewhere()
    assert _read() == (1, "one")
    assert _read() == (1, "one")


def test_inside_a_transaction_the_refusal_stands_and_the_rollback_clears_the_way(scratch_table):
    for _ in range(6):
        _read()
    _widen_the_column_elsewhere()
    with pytest.raises(NotSupportedError, match="cached plan"), transaction.atomic():
        _read()  # the transaction is aborted: nothing may run in it any more
    assert _read() == (1, "one")  # the rollback forgot the old statements
