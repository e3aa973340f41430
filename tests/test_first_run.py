"""A first run without rough edges: a landing page at /, a busy port named before anything
starts, and a local .env that never reaches git or the image."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT


@pytest.mark.django_db
def test_the_root_url_is_a_landing_page_linking_docs_console_and_health(client):
    """`make run` prints http://localhost:8000/ first: it answers 200 with the way on."""
    response = client.get("/")
    assert response.status_code == 200
    html = response.content.decode()
    for link in ("/api/docs/", "/admin/", "/healthz"):
        assert f'href="{link}"' in html


def test_the_browsers_favicon_request_is_no_content_not_a_404(client):
    response = client.get("/favicon.ico")
    assert response.status_code == 204 and "max-age" in response["Cache-Control"]


def test_a_busy_port_stops_make_run_first_naming_the_knob(tmp_path):
    """With the web port taken, the launcher exits at once with one line naming
    SAGARUNNER_PORT, and that another run on the same database takes the running one's demo
    token, before printing services, tokens or curl lines."""
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, str(REPO_ROOT / "scripts" / "run.py"), "--no-install"],
            cwd=REPO_ROOT,
            env={**os.environ, "SAGARUNNER_PORT": str(port), "SAGARUNNER_VAR_DIR": str(tmp_path)},
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode != 0
    assert f"port {port} is already in use" in done.stderr
    assert f"SAGARUNNER_PORT={port + 1} make run" in done.stderr
    # A second run on the same database takes the demo token of the one running: say so here.
    assert "its demo token replaces the running one's" in done.stderr
    assert "token" not in done.stdout and "services:" not in done.stdout


def test_dotenv_is_ignored_by_git_and_docker():
    """The compose file suggests a .env for SECRET_KEY: it must not be committed or baked in."""
    for name in (".gitignore", ".dockerignore"):
        lines = (REPO_ROOT / name).read_text().splitlines()
        assert ".env" in lines, name
