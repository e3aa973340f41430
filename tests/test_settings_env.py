"""Settings read strictly: a number or a switch that does not read as one stops start-up, naming
the variable, instead of being read as something else."""

from __future__ import annotations

import subprocess
import sys

import pytest
from django.core.exceptions import ImproperlyConfigured

from config.env import StrictEnv
from tests.conftest import REPO_ROOT
from tests.test_settings_and_launcher import fresh_env


def manage_py_check(tmp_path, **environ: str) -> subprocess.CompletedProcess[str]:
    """``manage.py check`` in a fresh process, as deployed, with ``environ`` set."""
    return subprocess.run(
        [sys.executable, "manage.py", "check"],
        cwd=REPO_ROOT,
        env=fresh_env(SECRET_KEY="x" * 50, SAGARUNNER_VAR_DIR=str(tmp_path), **environ),
        capture_output=True,
        text=True,
        timeout=120,
    )


def strict(**environ: str) -> StrictEnv:
    env = StrictEnv()
    env.ENVIRON = environ
    return env


@pytest.mark.parametrize(
    ("value", "expected"),
    [("10", 10.0), (" 0.5 ", 0.5), ("1e3", 1000.0), ("-2", -2.0), ("", 7.0), ("  ", 7.0)],
)
def test_a_number_is_read_whole_and_an_empty_one_is_the_default(value, expected):
    assert strict(X=value).float("X", default=7.0) == expected


@pytest.mark.parametrize("value", ["10m", "0,5", "1,000.00", "ten", "nan", "inf", "10 s"])
def test_a_number_with_anything_else_in_it_stops_start_up_naming_the_variable(value):
    """django-environ's own float kept the digits of ``10m`` (ten seconds meant as minutes) and
    read ``0,5`` as 0.5."""
    with pytest.raises(ImproperlyConfigured, match=f"SAGA_DEADLINE must be a number.*{value!r}"):
        strict(SAGA_DEADLINE=value).float("SAGA_DEADLINE", default=600.0)


@pytest.mark.parametrize("value", ["abc", "5.0", "5x", "ninety"])
def test_a_whole_number_is_refused_unless_whole(value):
    with pytest.raises(ImproperlyConfigured, match="SAGA_MAX_ATTEMPTS must be a whole number"):
        strict(SAGA_MAX_ATTEMPTS=value).int("SAGA_MAX_ATTEMPTS", default=5)
    assert strict(SAGA_MAX_ATTEMPTS=" 7 ").int("SAGA_MAX_ATTEMPTS", default=5) == 7


@pytest.mark.parametrize(
    ("value", "expected"),
    [("1", True), ("TRUE", True), ("yes", True), ("on", True), ("0", False), ("off", False)],
)
def test_a_switch_reads_its_known_words(value, expected):
    assert strict(S=value).bool("S", default=not expected) is expected


@pytest.mark.parametrize("value", ["maybe", "2", "enabled", "tru"])
def test_a_switch_that_says_neither_stops_start_up(value):
    """django-environ read anything but a known yes as no: ``maybe`` turned breakers off."""
    with pytest.raises(ImproperlyConfigured, match="SAGA_PROVIDER_BREAKERS must be on or off"):
        strict(SAGA_PROVIDER_BREAKERS=value).bool("SAGA_PROVIDER_BREAKERS", default=True)


def test_a_required_value_left_unset_is_named():
    with pytest.raises(ImproperlyConfigured, match="Set the X environment variable"):
        strict().int("X")


@pytest.mark.parametrize(
    ("setting", "value", "says"),
    [
        ("SAGA_DEADLINE", "10m", "SAGA_DEADLINE must be a number"),
        ("SAGA_PROVIDER_BREAKERS", "maybe", "SAGA_PROVIDER_BREAKERS must be on or off"),
        ("API_TOKEN_TTL_DAYS", "ninety", "API_TOKEN_TTL_DAYS must be a whole number"),
        ("ORDER_FRAUD_REVIEW_ABOVE", "1,000.00", "ORDER_FRAUD_REVIEW_ABOVE must be an amount"),
        ("ORDER_FRAUD_REVIEW_ABOVE", "-1", "ORDER_FRAUD_REVIEW_ABOVE must be an amount"),
        # Past start-up, each request that used the cache was a 500 (a TypeError or ValueError
        # from the Redis client on its first connection).
        (
            "CACHE_URL",
            "redis://127.0.0.1:6379/8?a=1&b=2",
            "CACHE_URL has an option the Redis client refuses: ",
        ),
        (
            "CACHE_URL",
            "redis://127.0.0.1:6379/8?socket_timeout=abc",
            "CACHE_URL has an option the Redis client refuses: ",
        ),
        (
            "SAGA_PUMP_REDIS_URL",
            "redis://127.0.0.1:6379/8?zz=1",
            "SAGA_PUMP_REDIS_URL has an option the Redis client refuses: ",
        ),
    ],
)
def test_manage_py_stops_with_one_line_naming_the_setting(tmp_path, setting, value, says):
    """As deployed: ``manage.py check`` exits 2 with the one line, no traceback. A malformed
    ``ORDER_FRAUD_REVIEW_ABOVE`` was read as text and failed every order's saga at its fraud
    review step (each worker task a ``decimal.InvalidOperation``), with nothing at start."""
    result = manage_py_check(tmp_path, **{setting: value})
    assert result.returncode == 2, result.stderr
    assert says in result.stderr and "Traceback" not in result.stderr, result.stderr


@pytest.mark.parametrize("command", [["worker", "-Q", "nowhere"], ["beat"]], ids=["worker", "beat"])
def test_a_worker_or_beat_stops_with_one_line_too(tmp_path, command):
    """Celery reads its configuration, and so the settings, before anything of ours runs: a
    malformed setting ended a worker's or beat's start in a traceback of some ninety lines
    (exit 1), where manage.py says one line (exit 2)."""
    result = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "config", *command, "-l", "info"],
        cwd=REPO_ROOT,
        env=fresh_env(
            SECRET_KEY="x" * 50,
            SAGARUNNER_VAR_DIR=str(tmp_path),
            SAGA_DEADLINE="10m",
            CELERY_BROKER_URL="redis://127.0.0.1:1/0",  # never reached
        ),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "refusing to start: SAGA_DEADLINE must be a number" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout, result.stderr[-3000:]


@pytest.mark.parametrize(
    ("value", "says"),
    [("-1", "above 0"), ("0", "above 0")],
)
def test_a_duration_that_must_pass_is_above_zero(value, says):
    """A negative ``SAGA_DEADLINE`` was taken: every saga would be timed out at its first look."""
    with pytest.raises(ImproperlyConfigured, match=f"SAGA_DEADLINE must be a number {says}"):
        strict(SAGA_DEADLINE=value).float("SAGA_DEADLINE", default=600.0, positive=True)


def test_a_number_that_may_be_off_is_at_least_zero_and_a_count_at_least_its_minimum():
    assert strict(B="0").float("B", default=2.0, minimum=0) == 0.0
    with pytest.raises(ImproperlyConfigured, match="B must be at least 0, not '-0.5'"):
        strict(B="-0.5").float("B", default=2.0, minimum=0)
    assert strict(N="1").int("N", default=5, minimum=1) == 1
    with pytest.raises(ImproperlyConfigured, match="N must be at least 1, not '0'"):
        strict(N="0").int("N", default=5, minimum=1)


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("SAGA_DEADLINE", "-1"),
        ("SAGA_STEP_TIMEOUT", "0"),
        ("SAGA_MAX_ATTEMPTS", "0"),
        ("SAGA_INLINE_BUDGET", "-1"),
        ("WEBHOOKS_TIMEOUT", "-3"),
        ("API_TOKEN_TTL_DAYS", "0"),
        # A worker started directly (no manage.py check) read an endpoint's whole answer.
        ("WEBHOOKS_RESPONSE_EXCERPT", "-1"),
        ("WORKER_METRICS_PORT", "-1"),
    ],
)
def test_the_settings_refuse_values_out_of_their_range(tmp_path, setting, value):
    result = manage_py_check(tmp_path, **{setting: value})
    assert result.returncode == 2, result.stderr
    assert f"sagarunner: {setting} must be" in result.stderr, result.stderr
