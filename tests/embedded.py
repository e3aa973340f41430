"""The embedded setup ``make run`` falls back to without services (SQLite, an in-memory broker),
in a subprocess: for tests of what must hold there too."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.conftest import REPO_ROOT
from tests.test_settings_and_launcher import fresh_env


def run_on_embedded_sqlite(tmp_path: Path, script: str, **extra_env: str) -> Any:
    """Migrate a new SQLite database under ``tmp_path``, run ``script`` (``python -c``) on it,
    and return the JSON its last line prints."""
    env = fresh_env(
        DJANGO_SETTINGS_MODULE="config.settings",
        DATABASE_URL=f"sqlite:///{tmp_path / 'db.sqlite3'}",
        CELERY_BROKER_URL="memory://",
        SECRET_KEY="test-only",
        HTTPS_ONLY="0",
        LOG_LEVEL="warning",
        **extra_env,
    )

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, *args],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )

    migrated = run("manage.py", "migrate", "-v0")
    assert migrated.returncode == 0, migrated.stderr
    ran = run("-c", script)
    assert ran.returncode == 0, ran.stderr
    return json.loads(ran.stdout.strip().splitlines()[-1])
