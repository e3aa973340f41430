"""What web writes to its log: each 4xx once (gunicorn's access line), every line JSON when
``LOG_FORMAT=json`` (gunicorn's own lines too, the access line's request as fields), no control
socket at a path that every gunicorn of the same user shares, and no warning about static
files on a fresh checkout.

Runs gunicorn exactly as ``make run`` starts it (the web line of its Procfile), from the
project root, against this session's database.
"""

from __future__ import annotations

import json
import shlex
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from django.db import connection

from lab.stack import answers, spare_port
from lab.supervisor import Process
from tests.conftest import REPO_ROOT, database_url_for

pytestmark = pytest.mark.django_db(transaction=True)

#: The key the web process runs with.
SECRET_KEY = "test-web-logs-not-secret"


def _make_run_web_argv(port: int) -> list[str]:
    """The web command of ``make run``'s Procfile, without the supervisor in front of it."""
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    try:
        import run
    finally:
        sys.path.pop(0)
    lines = dict(line.split(": ", 1) for line in run.procfile(port).splitlines())
    argv = shlex.split(lines["web"].removeprefix("exec "))
    return argv[argv.index("--") + 1 :]


def _env(tmp_path: Path) -> dict[str, str]:
    import os

    metrics = tmp_path / "metrics"
    metrics.mkdir()
    return {
        **os.environ,
        "DATABASE_URL": database_url_for(connection.settings_dict),
        "CELERY_BROKER_URL": "memory://",
        "CACHE_URL": f"file://{tmp_path / 'cache'}",
        "SECRET_KEY": SECRET_KEY,
        "HTTPS_ONLY": "0",
        "LOG_FORMAT": "json",
        "PROMETHEUS_MULTIPROC_DIR": str(metrics),
        # A fresh var/ (as in a new clone): nothing collected into staticfiles/ yet.
        "SAGARUNNER_VAR_DIR": str(tmp_path / "var"),
        # Where gunicorn would put its default control socket: here, not in the real home.
        "XDG_RUNTIME_DIR": str(tmp_path),
        "HOME": str(tmp_path),
    }


def test_gunicorn_of_make_run_has_no_control_socket(tmp_path):
    """gunicorn reads ./gunicorn.conf.py: the control socket is off for the web line of make
    run (and every other gunicorn started from the project root)."""
    argv = _make_run_web_argv(spare_port())
    probe = (
        "import sys; from gunicorn.app.wsgiapp import WSGIApplication; "
        f"sys.argv = {['gunicorn', *argv[argv.index('gunicorn') + 1 :]]!r}; "
        "print(WSGIApplication().cfg.control_socket_disable)"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=REPO_ROOT,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "True", done.stdout


@contextmanager
def _make_run_web(tmp_path: Path, wait_for: Any, **env: str) -> Iterator[tuple[Process, int]]:
    """gunicorn as ``make run`` starts it, answering on a port of its own; stopped after.
    ``env`` adds to (or overrides) the environment."""
    port = spare_port()
    web = Process(
        "web",
        _make_run_web_argv(port),
        env={**_env(tmp_path), **env},
        log_path=tmp_path / "web.log",
    )
    web.start()
    try:
        wait_for(lambda: answers("127.0.0.1", port) or not web.alive, timeout=60)
        assert web.alive, web.log_tail()
        yield web, port
    finally:
        web.stop(timeout=15)


def _access_lines(log: str) -> list[dict]:
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("logger") == "gunicorn.access"]


def test_a_4xx_is_logged_once(tmp_path, wait_for):
    """A 404 and a 401 from the API: each is one access line, with no second line from
    Django's request logger ("Not Found: ..."); gunicorn announces no control socket. With
    LOG_FORMAT=json every line is a JSON object, gunicorn's included, and an access line has
    the request as fields."""
    with _make_run_web(tmp_path, wait_for) as (web, port):
        statuses = {}
        for path in ("/api/v1/no-such-route/", "/api/v1/orders/"):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30)
            except urllib.error.HTTPError as error:
                statuses[path] = error.code
        assert statuses == {"/api/v1/no-such-route/": 404, "/api/v1/orders/": 401}
        # The access line is written after the response; Django's request logger would have
        # written its line before it, in the same worker: once both access lines are there,
        # every line these requests cause is in the log.
        wait_for(
            lambda: {a["path"] for a in _access_lines(web.log_tail(10**6))} >= set(statuses),
            timeout=30,
            describe=lambda: web.log_tail(3000),
        )
    log = web.log_path.read_text()
    # "--- HH:MM:SS start ..." lines are the test's own process supervisor's, not gunicorn's.
    ours = [line for line in log.splitlines() if line and not line.startswith("--- ")]
    not_json = [line for line in ours if not line.startswith("{")]
    assert not not_json, not_json
    by_path = {a["path"]: a for a in _access_lines(log)}
    for path, status in statuses.items():
        access = by_path[path]
        assert (access["method"], access["status"], access["event"]) == (
            "GET",
            status,
            "http.request",
        )
        assert access["level"] == "info" and access["duration_ms"] >= 0, access
    assert any("Booting worker" in json.loads(line)["event"] for line in ours), log
    for path in statuses:
        mentions = [line for line in log.splitlines() if path in line]
        assert len(mentions) == 1, mentions
    request_lines = [
        line
        for line in log.splitlines()
        if line.startswith("{") and json.loads(line).get("logger") == "django.request"
    ]
    assert not request_lines, request_lines
    assert "Control socket listening" not in log, log[-3000:]
    # Nothing but requests: no warning that static files were never collected.
    assert "No directory at" not in log, log[-3000:]


def test_a_request_django_refuses_as_suspicious_is_one_warning_line(tmp_path, wait_for, settings):
    """A console filter on a hidden column (``?secret__startswith=``) is the 400 it should
    be, and the log has one WARNING line for it, without a traceback: no ERROR from
    ``django.security`` with Django's traceback, and, under ``make run``'s DEBUG, no second
    copy in plain text from Django's own console handler. The refused value is not logged."""
    from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY
    from django.contrib.auth.models import Permission, User
    from django.contrib.sessions.backends.db import SessionStore

    # The server's key, so that the session made here is one it reads.
    settings.SECRET_KEY = SECRET_KEY
    staff = User.objects.create_user("vic", is_staff=True)
    staff.user_permissions.add(Permission.objects.get(codename="view_endpoint"))
    session = SessionStore()
    session[SESSION_KEY] = str(staff.pk)
    session[BACKEND_SESSION_KEY] = "django.contrib.auth.backends.ModelBackend"
    session[HASH_SESSION_KEY] = staff.get_session_auth_hash()
    session.save()
    path = "/admin/webhooks/endpoint/"
    with _make_run_web(tmp_path, wait_for, DEBUG="1", LOG_FORMAT="json") as (web, port):
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}{path}?secret__startswith=whsec_guess",
            headers={"Cookie": f"{settings.SESSION_COOKIE_NAME}={session.session_key}"},
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        assert refused.value.code == 400
        wait_for(
            lambda: path in {a["path"] for a in _access_lines(web.log_tail(10**6))},
            timeout=30,
            describe=lambda: web.log_tail(3000),
        )
    log = web.log_path.read_text()
    ours = [line for line in log.splitlines() if line and not line.startswith("--- ")]
    not_json = [line for line in ours if not line.startswith("{")]
    assert not not_json, not_json[:5]  # no plain-text copy (Django's console handler)
    lines = [json.loads(line) for line in ours]
    security = [line for line in lines if line.get("logger", "").startswith("django.security")]
    assert security == [
        {
            "event": "DisallowedModelAdminLookup: Filtering by secret__startswith not allowed; "
            f"answered 400 Bad Request to GET {path}",
            "level": "warning",
            "logger": "django.security.DisallowedModelAdminLookup",
            "timestamp": security[0]["timestamp"],
        }
    ], security
    assert "Traceback" not in log, log[-3000:]
    # The guess is in the access line's query (as every request's is), nowhere else.
    told = [line for line in lines if "whsec_guess" in json.dumps(line)]
    assert [line["logger"] for line in told] == ["gunicorn.access"], told
    assert not [line for line in lines if line.get("level") in ("error", "critical")], log


def _raw_request(port: int, request: bytes) -> bytes:
    """Send bytes no HTTP client library would send; the whole answer (gunicorn closes)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_a_request_gunicorn_refuses_itself_is_answered_in_the_apis_json_error_shape(
    tmp_path, wait_for
):
    """A control character in a header is refused by gunicorn before Django sees it: the
    answer is still a 400 with the API's error body, not gunicorn's HTML page."""
    with _make_run_web(tmp_path, wait_for) as (_, port):
        answer = _raw_request(
            port,
            b"GET /api/v1/orders/ HTTP/1.1\r\nHost: 127.0.0.1\r\nIdempotency-Key: a\x01b\r\n\r\n",
        )
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].startswith("HTTP/1.1 400 "), answer[:500]
    assert "Content-Type: application/json" in lines, lines
    error = json.loads(body)
    assert error["code"] == "bad_request" and error["fields"] == {}, error
    assert error["detail"].startswith("Bad Request: "), error
    # Written as DRF writes JSON, like every other error: byte for byte the same shape.
    assert body == json.dumps(error, separators=(",", ":"), ensure_ascii=False).encode(), body


def test_gunicorn_env_option_decides_the_format_of_its_own_lines(monkeypatch):
    """``gunicorn -e LOG_FORMAT=console`` reaches os.environ only after the logger is set up;
    the logger reads it from gunicorn's config, so its lines agree with the workers'."""
    from types import SimpleNamespace

    from config.gunicorn_logging import log_format

    monkeypatch.setenv("LOG_FORMAT", "json")
    assert log_format(SimpleNamespace(env={"LOG_FORMAT": "console"})) == "console"
    assert log_format(SimpleNamespace(env={})) == "json"


def test_a_json_line_is_written_even_when_a_message_does_not_fit_its_arguments():
    import logging

    from config.gunicorn_logging import JsonLineFormatter

    record = logging.LogRecord(
        "gunicorn.error", logging.ERROR, __file__, 1, "%d workers", ("x",), None
    )
    line = json.loads(JsonLineFormatter().format(record))
    assert line["event"] == "%d workers ('x',)" and line["level"] == "error" and line["pid"]
