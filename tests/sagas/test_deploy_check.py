"""The deploy check: unfinished sagas on a version the code lacks, or has silently changed,
fail ``manage.py check`` and stop a worker at start, naming type, version and count."""

from __future__ import annotations

import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.db import connection

from sagas.definition import SagaDefinition, get_definition, register, unregister
from sagas.models import Saga, SagaState
from sagas.services import saga_start
from tests.conftest import REPO_ROOT, WorkerHandle, _worker_env, database_url_for
from tests.sagas.sagatypes import scripted


@contextmanager
def without_v1() -> Iterator[None]:
    """This process plays code that no longer registers ``ver`` v1."""
    v1 = get_definition("ver", 1)
    unregister("ver", 1)
    try:
        yield
    finally:
        register(v1)


@contextmanager
def edited_v1() -> Iterator[None]:
    """This process plays code whose ``ver`` v1 got a step inserted without a version bump."""
    v1 = get_definition("ver", 1)
    register(SagaDefinition("ver", steps=scripted(["a", "fraud", "b", "c"], pivot="c")))
    try:
        yield
    finally:
        register(v1)


def start(version: int, **fields) -> Saga:
    saga = saga_start(saga_type="ver", data={}, version=version)
    if fields:
        Saga.objects.filter(pk=saga.pk).update(**fields)
    return saga


def check_output() -> str:
    with pytest.raises(SystemCheckError) as failed:
        call_command("check")
    return str(failed.value)


@pytest.mark.django_db
def test_check_names_type_version_and_count_of_sagas_on_a_missing_version():
    start(1)
    start(1, state=SagaState.NEEDS_MANUAL)
    start(1, state=SagaState.SUCCEEDED)  # finished: may lose its definition
    start(2)
    call_command("check")  # the code that started them has v1
    with without_v1():
        out = check_output()
    assert "sagas.E001" in out
    assert "2 unfinished 'ver' sagas run on version 1" in out
    assert "registered: v2" in out and "saga_migrate ver --from 1" in out
    assert "version 2" not in out


@pytest.mark.django_db
def test_check_names_a_type_with_no_version_registered_and_how_to_let_its_sagas_finish():
    from sagas.checks import definition_problems
    from sagas.selectors import VersionCount

    (error,) = definition_problems([VersionCount("gone", 3, "", 7)])
    assert error.id == "sagas.E001"
    assert error.msg == (
        "7 unfinished 'gone' sagas run on version 3 of a type this code does not register at all."
    )
    assert "SAGA_DEFINITION_MODULES" in error.hint and "saga_migrate" not in error.hint


@pytest.mark.django_db
def test_check_passes_once_the_old_version_has_drained():
    start(1, state=SagaState.COMPENSATED)
    start(2)
    with without_v1():
        call_command("check")


@pytest.mark.django_db
def test_check_catches_a_shape_change_without_a_version_bump():
    start(1)
    call_command("check")
    with edited_v1():
        out = check_output()
    assert "sagas.E002" in out
    assert "1 unfinished 'ver' saga started on version 1 with shape" in out


def _manage_check(database_url: str) -> subprocess.CompletedProcess:
    env = _worker_env({"DATABASE_URL": database_url})
    return subprocess.run(
        [sys.executable, "manage.py", "check"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.django_db
def test_check_passes_on_a_fresh_database_and_an_unreachable_one():
    """Before the first migrate there is no saga table; a database that does not answer is
    not the check's business: neither crashes ``check``."""
    url = database_url_for(connection.settings_dict)
    admin_url = url.rsplit("/", 1)[0] + "/postgres"
    fresh = f"{connection.settings_dict['NAME']}_fresh"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{fresh}"')
        conn.execute(f'CREATE DATABASE "{fresh}"')
    try:
        done = _manage_check(url.rsplit("/", 1)[0] + f"/{fresh}")
        assert done.returncode == 0, done.stderr
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{fresh}"')
    done = _manage_check("postgres://postgres@127.0.0.1:1/nowhere")
    assert done.returncode == 0, done.stderr


@pytest.mark.django_db(transaction=True)
def test_a_worker_refuses_to_start_without_the_definition_of_unfinished_sagas():
    # Written directly (no doorbell): a session worker must not finish it meanwhile.
    v1 = get_definition("ver", 1)
    Saga.objects.create(
        saga_type="ver",
        definition_version=1,
        definition_fingerprint=v1.fingerprint,
        current_step="a",
    )
    env = _worker_env({"TEST_SAGA_WITHOUT": "ver:1"})
    done = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "config", "worker", "-Q", "nowhere", "-P", "solo"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert "refusing to start: 1 unfinished 'ver' saga run on version 1" in done.stderr


def test_a_worker_whose_database_does_not_answer_says_so_and_still_starts():
    """A database that is down when the worker starts is said once, as an error line, and the
    worker comes up anyway (its tasks connect again each time), so a database that starts
    after it costs nothing. Before, it said "ready" and nothing more."""
    env = _worker_env(
        {
            "DATABASE_URL": "postgres://postgres@127.0.0.1:1/nowhere",
            "CELERY_QUEUE": f"dbdown-{uuid.uuid4().hex[:8]}",
        }
    )
    worker = WorkerHandle("dbdown", env, concurrency=1, pool="prefork")
    try:
        worker.wait_ready()
        log = worker.log_text()
    finally:
        worker.stop()
    lines = [line for line in log.splitlines() if "worker.database_unreachable" in line]
    assert len(lines) == 1, log[-3000:]
    assert re.search(r"level\W{1,4}error", lines[0]) and "port 1 failed" in lines[0], lines[0]
