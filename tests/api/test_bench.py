"""``manage.py api_bench`` runs end to end (tiny numbers): gunicorn on a scratch database,
every request answered 200/201, and the query counts the API promises."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow


def test_api_bench_runs_and_reports_constant_query_counts(tmp_path):
    """The command exits 0 and reports the three phases; POST and GET detail each run a fixed
    number of queries (min == max) whatever the order's item count (1 to 3), the detail at most
    5 and the list page of 20 the same small number as the detail plus one."""
    out = tmp_path / "bench.json"
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings"}
    result = subprocess.run(
        [
            sys.executable,
            "manage.py",
            "api_bench",
            "--requests",
            "60",
            "--warmup",
            "10",
            "--clients",
            "3",
            "--workers",
            "2",
            "--json",
            str(out),
        ],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    phases = {r["phase"]: r for r in json.loads(out.read_text())}
    post, detail, listing = (
        phases["POST /orders/"],
        phases["GET /orders/{id}/"],
        phases["GET /orders/ (20/page)"],
    )
    assert post["statuses"] == {"201": 60}
    assert detail["statuses"] == {"200": 60}
    assert listing["statuses"] == {"200": 60}
    assert post["queries_min"] == post["queries_max"]
    assert detail["queries_min"] == detail["queries_max"] <= 5
    assert listing["queries_max"] == detail["queries_max"] + 1
    assert "req/s" in result.stdout and "p99 ms" in result.stdout
