"""The development app (``lab/``) stays out of production's way.

Production (the image leaves ``lab/`` out; ``SAGARUNNER_LAB=0`` gives a checkout the same
shape) lists none of the tooling commands and no benchmark saga type; a checkout has the
commands, still without registering ``bench5`` until a benchmark imports it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys

import pytest

from lab import bench_saga
from lab.supervisor import Supervisor, kill_pid, pid_alive
from tests.conftest import REPO_ROOT

TOOLING = {"chaos", "saga_bench", "generate_sagas", "api_bench", "admin_bench"}
PROBE = (
    "import json, django; django.setup(); "
    "from django.conf import settings; "
    "from django.core.management import get_commands; "
    "from sagas.definition import registered_types; "
    "print(json.dumps({'apps': settings.INSTALLED_APPS, 'types': registered_types(), "
    "'commands': sorted(get_commands())}))"
)


def _probe(**env_over: str) -> dict:
    """Settings, saga types and commands of a fresh process with the default settings."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("SAGA_DEFINITION_MODULES", "SAGARUNNER_LAB")
    }
    env.update(env_over)
    result = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_production_shape_has_no_tooling_commands_and_no_bench_type():
    seen = _probe(SAGARUNNER_LAB="0")
    assert "lab" not in seen["apps"]
    assert not TOOLING & set(seen["commands"])
    assert "check_invariants" in seen["commands"]  # operators run it: it stays with orders
    assert "bench5" not in seen["types"]
    assert "order" in seen["types"]


def test_checkout_has_the_tooling_commands_but_registers_no_bench_type_by_default():
    seen = _probe()
    assert "lab" in seen["apps"]
    assert set(seen["commands"]) >= TOOLING
    assert "bench5" not in seen["types"]


def test_bench_workers_are_told_to_register_the_bench_type():
    env = bench_saga.worker_env({"SAGA_DEFINITION_MODULES": "tests.sagas.sagatypes", "X": "1"})
    assert env["SAGA_DEFINITION_MODULES"] == "tests.sagas.sagatypes,lab.bench_saga"
    assert env["X"] == "1"
    assert bench_saga.worker_env(env) == env
    assert bench_saga.worker_env({})["SAGA_DEFINITION_MODULES"] == "lab.bench_saga"


def test_supervisor_finds_kills_and_stops_a_process_tree(tmp_path, wait_for):
    """One child SIGKILLed alone leaves the rest running; stop_all ends every group."""
    supervisor = Supervisor(tmp_path)
    tree = supervisor.start("tree", ["sh", "-c", "echo started; sleep 60 & sleep 60 & wait"])
    children = wait_for(lambda: len(tree.children()) == 2 and tree.children())
    assert kill_pid(children[0])
    wait_for(lambda: not pid_alive(children[0]))
    assert tree.alive and pid_alive(children[1])
    supervisor.stop_all(timeout=5)
    assert not tree.alive
    wait_for(lambda: not pid_alive(children[1]))
    assert "started" in supervisor.logs()["tree"]


def test_chaos_deadline_outlasts_the_outage_and_its_drain():
    """The full run's deadline leaves an order parked at the start of the outage time to settle
    after the backlog drained at the offered share of the capacity; no outage (or the quick
    run's short one) keeps the old 120 s."""
    from lab.chaos import DEADLINE_MARGIN, LOAD_SHARE, MIN_DEADLINE, ChaosConfig, deadline_for

    full = ChaosConfig()
    drained = full.outage_seconds + full.outage_seconds * LOAD_SHARE / (1 - LOAD_SHARE)
    assert deadline_for(full) == drained + DEADLINE_MARGIN == 180
    assert deadline_for(ChaosConfig.quick()) == MIN_DEADLINE
    assert deadline_for(ChaosConfig(outage_seconds=0)) == MIN_DEADLINE


@pytest.mark.django_db(transaction=True)
def test_the_in_process_statement_count_keeps_the_engine_quiet(caplog, settings):
    """saga_bench counts an engine step's statements with one saga run in its own process: the
    count is the 0.4 the README states (the claim and one record for the run of five steps),
    and that saga's transition lines stay out of the benchmark's output (the engine logs at
    info)."""
    from lab.engine_bench import engine_queries_per_step  # bench5 is registered above

    settings.SAGA_INLINE_BUDGET = 60  # all five steps in the one delivery, however slow

    with caplog.at_level(logging.INFO, logger="sagas.engine"):
        assert engine_queries_per_step() == pytest.approx(0.4)
    assert [r for r in caplog.records if r.name == "sagas.engine"] == []
    assert logging.getLogger("sagas.engine").getEffectiveLevel() == logging.INFO  # restored


def _burst(per_s: float, worker_ms: float) -> tuple:
    from lab.engine_bench import Result

    result = Result("engine", 1000, 1000 / per_s, per_s, 10.0, 20.0)
    return result, {"worker_cpu_ms_per_saga": worker_ms}


def test_a_saturation_row_is_the_median_burst_with_its_own_costs():
    """One slow or fast burst does not move the figure, and the row's CPU is that burst's."""
    from lab.bench_suite import median_burst

    slow, middle, fast = _burst(202.3, 4.1), _burst(250.0, 3.1), _burst(265.0, 2.9)
    assert median_burst([fast, slow, middle]) == middle
    assert median_burst([slow, fast]) == slow  # an even number: the lower middle one
    assert median_burst([fast]) == fast


def _workload(label: str, *per_s: float) -> dict:
    bursts = [{"sagas_per_s": x, "p50_ms": 1.0, "p99_ms": 2.0} for x in per_s]
    return {
        "label": label,
        "saturation": bursts[len(bursts) // 2],
        "bursts": bursts,
        "levels": [],
        "sessions_per_1000_sagas": 0.2,
    }


def test_the_report_shows_every_burst_and_the_range_of_each_ratio(capsys):
    from lab.bench_suite import print_report, ratio_range

    engine = _workload("engine 5-step saga", 200.0, 250.0, 260.0)
    chain = _workload("plain celery chain", 100.0, 125.0, 130.0)
    assert ratio_range(engine, chain) == (200.0 / 130.0, 260.0 / 100.0)
    assert ratio_range(_workload("a", 200.0), _workload("b", 100.0)) is None
    machine = {
        "cores": 2, "cpu": "x", "memory_gib": 1, "postgresql": "15", "redis": "7",
        "loadavg_at_start": [0.1], "loadavg_at_end": [0.2],
    }  # fmt: skip
    print_report({"workloads": {"engine": engine, "chain": chain}, "machine": machine})
    out = capsys.readouterr().out
    assert "engine 5-step saga 200.0, 250.0, 260.0" in out
    assert "ratio engine 5-step saga / plain celery chain: 2.00x sagas/s" in out
    assert "(any burst against any: 1.54x-2.60x)" in out


@pytest.mark.django_db(transaction=True)
def test_the_settled_poll_asks_about_one_saga_until_its_window_has_settled():
    """The benchmark's wait for its sagas costs one lookup a poll while the 100th oldest
    pending saga (or the youngest, once fewer are left) is running, the whole window only once
    that one has settled; and it ends only when every saga has, whatever the order."""
    from django.db import connection, transaction
    from django.test.utils import CaptureQueriesContext

    from lab.engine_bench import _Settled
    from sagas.models import Saga, SagaState
    from sagas.services import saga_start

    with transaction.atomic():
        ids = [saga_start(saga_type="bench5", data={"run": "poll", "n": i}).id for i in range(150)]
        # Out of any worker's reach: this test settles them itself.
        Saga.objects.filter(id__in=ids).update(version=10_000, next_attempt_at=None)
    poll = _Settled(ids)

    def settle(some: list) -> None:
        Saga.objects.filter(id__in=some).update(state=SagaState.SUCCEEDED)

    def polled() -> tuple[bool, list[int]]:
        """Whether the poll said done, and how many sagas each of its queries asked about."""
        with CaptureQueriesContext(connection) as captured:
            done = poll()
        return done, [len(re.findall(r"[0-9a-f]{32}", q["sql"])) for q in captured.captured_queries]

    settle(ids[:99])
    assert polled() == (False, [1])  # the 100th oldest still runs
    settle([ids[140], ids[99]])  # a younger one out of turn, then the 100th
    assert polled() == (False, [1, 100])
    assert poll.pending == ids[100:]  # the younger one is forgotten once in the window
    settle(ids[100:149])
    assert polled() == (False, [1])  # the youngest still runs
    settle([ids[149]])
    assert polled() == (True, [1, 50])


@pytest.mark.django_db(transaction=True)
def test_the_bench_vacuums_and_analyzes_the_tables_holding_rows_only():
    """``make bench`` gives every workload a database as autovacuum would keep it (it is off on
    CI-like machines, where the order saga inherited the engine workloads' dead rows): a table
    holding rows, dead ones among them, is vacuumed and analyzed; a table never written to is
    left as it is (vacuumed empty, the planner would take it for a table of no pages)."""
    from django.db import connection

    from lab.bench_suite import vacuum_database

    def stats(table: str) -> tuple[int, int, float]:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_stat_clear_snapshot()")
            cursor.execute(
                "SELECT s.vacuum_count, s.analyze_count, c.reltuples FROM pg_stat_user_tables s "
                "JOIN pg_class c ON c.oid = s.relid WHERE s.relname = %s",
                [table],
            )
            return cursor.fetchone()

    with connection.cursor() as cursor:
        cursor.execute("CREATE TABLE bench_probe_rows (id int)")
        cursor.execute("CREATE TABLE bench_probe_empty (id int)")
    try:
        with connection.cursor() as cursor:
            cursor.execute("INSERT INTO bench_probe_rows SELECT generate_series(1, 3)")
            cursor.execute("DELETE FROM bench_probe_rows WHERE id = 1")
        assert stats("bench_probe_rows") == (0, 0, -1) == stats("bench_probe_empty")
        assert vacuum_database() >= 0
        assert stats("bench_probe_rows") == (1, 1, 2)  # the dead row gone, the live counted
        assert stats("bench_probe_empty") == (0, 0, -1)  # still "never vacuumed"
    finally:
        with connection.cursor() as cursor:
            cursor.execute("DROP TABLE bench_probe_rows, bench_probe_empty")
