"""Production settings: ``check --deploy`` is clean, and the environment a deployment sets
turns into HTTPS redirects, HSTS, secure cookies and the browser protection headers."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import textwrap

from tests.conftest import REPO_ROOT
from tests.test_settings_and_launcher import fresh_env


def production_env(tmp_path, **extra: str) -> dict[str, str]:
    """What a deployment sets: a real secret and its host name; DEBUG, HTTPS_ONLY and the
    tests' WEBHOOKS_ALLOW_PRIVATE unset."""
    env = fresh_env(
        SECRET_KEY=secrets.token_urlsafe(50),
        ALLOWED_HOSTS="ops.example.com",
        SAGARUNNER_VAR_DIR=str(tmp_path),
        PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "metrics"),
    )
    env.pop("WEBHOOKS_ALLOW_PRIVATE", None)
    return {**env, **extra}


def check_deploy(tmp_path, **extra: str) -> subprocess.CompletedProcess[str]:
    """``manage.py check --deploy --fail-level WARNING`` in a fresh process, as deployed."""
    return subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=REPO_ROOT,
        env=production_env(tmp_path, **extra),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_check_deploy_is_clean_with_production_settings(tmp_path):
    """``manage.py check --deploy --fail-level WARNING`` exits 0 with no issue, both with TLS
    at the web process and with TLS ended by a proxy."""
    for extra in ({}, {"SECURE_PROXY_SSL_HEADER": "X-Forwarded-Proto"}):
        result = check_deploy(tmp_path, **extra)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "System check identified no issues" in result.stdout, result.stdout


def test_check_deploy_warns_when_https_is_switched_off(tmp_path):
    """The same check catches a deployment that turned HTTPS off (so the test above is not
    vacuous): no redirect, insecure cookies."""
    result = check_deploy(tmp_path, HTTPS_ONLY="0")
    assert result.returncode != 0
    for warning in ("security.W004", "security.W008", "security.W012", "security.W016"):
        assert warning in result.stderr + result.stdout


def test_check_deploy_warns_when_webhooks_may_reach_private_addresses(tmp_path):
    """Production settings refuse http and internal webhook URLs (the clean check above runs
    with WEBHOOKS_ALLOW_PRIVATE unset); a deployment that switches that off is caught."""
    result = check_deploy(tmp_path, WEBHOOKS_ALLOW_PRIVATE="1")
    assert result.returncode != 0
    assert "webhooks.W001" in result.stderr + result.stdout


_PROBE = textwrap.dedent(
    """
    import json, django
    django.setup()
    from django.test import Client
    c = Client(HTTP_HOST="ops.example.com")
    out = {}
    for name, path, headers in [
        ("plain", "/admin/login/", {}),
        ("proxied", "/admin/login/", {"HTTP_X_FORWARDED_PROTO": "https"}),
        ("health", "/healthz", {}),
    ]:
        r = c.get(path, **headers)
        out[name] = {"status": r.status_code, "headers": dict(r.headers),
                     "cookies": {k: dict(v) for k, v in r.cookies.items()}}
    print(json.dumps(out))
    """
)


def test_production_responses_redirect_to_https_and_carry_the_protections(tmp_path):
    """Behind a TLS proxy: plain http is redirected to https, except the health check; an
    https request gets HSTS, CSP, X-Frame-Options, Referrer-Policy, nosniff, and a CSRF cookie
    marked Secure."""
    result = subprocess.run(
        [sys.executable, "-c", _PROBE],
        cwd=REPO_ROOT,
        env=production_env(tmp_path, SECURE_PROXY_SSL_HEADER="X-Forwarded-Proto"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])

    assert out["plain"]["status"] == 301
    assert out["plain"]["headers"]["Location"] == "https://ops.example.com/admin/login/"
    assert out["health"]["status"] in (200, 503)  # not redirected: probes speak plain http

    proxied = out["proxied"]
    headers = proxied["headers"]
    assert proxied["status"] == 200
    assert headers["Strict-Transport-Security"] == "max-age=3600; includeSubDomains"
    assert headers["X-Frame-Options"] == "DENY"
    assert headers["Referrer-Policy"] == "same-origin"
    assert headers["X-Content-Type-Options"] == "nosniff"
    csp = headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp
    assert "frame-ancestors 'none'" in csp and "object-src 'none'" in csp
    assert proxied["cookies"]["csrftoken"]["secure"] is True
