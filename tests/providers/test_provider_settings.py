"""``SAGA_PROVIDERS`` is checked when a worker starts: a typo stops it with the culprit's name
(docs/providers.md), instead of failing each saga at its first call to that provider and
spending one of its attempts every time."""

from __future__ import annotations

import json

import pytest
from django.core.exceptions import ImproperlyConfigured

from providers.config import check_provider_settings
from tests.conftest import worker_refusing_to_start

KNOWN = {"payments", "inventory", "shipping"}


@pytest.mark.parametrize(
    ("providers", "named"),
    [
        ({"payments": {"bogus": 1}}, "unknown knob 'bogus'"),
        ({"payments": {"min_calls": -1}}, "['min_calls'] must be a non-negative number"),
        ({"payments": {"failure_rate": 2}}, "must be <= 1"),
        ({"nosuchprovider": {"rate": 1}}, "no step calls a provider 'nosuchprovider'"),
        ({"payments": [1]}, "SAGA_PROVIDERS['payments'] must be a JSON object"),
        ([1, 2], "SAGA_PROVIDERS must be a JSON object"),
    ],
)
def test_bad_provider_settings_are_refused_naming_the_culprit(settings, providers, named):
    settings.SAGA_PROVIDERS = providers
    with pytest.raises(ImproperlyConfigured) as refused:
        check_provider_settings(KNOWN)
    assert named in str(refused.value)


def test_good_provider_settings_pass(settings):
    settings.SAGA_PROVIDERS = {"payments": {"max_in_flight": 20, "rate": 5.5}}
    check_provider_settings(KNOWN)


@pytest.mark.django_db
def test_a_real_worker_with_a_provider_typo_refuses_to_start():
    """Before its pool and its broker (down here): a worker that looked for the broker first
    would wait for it and never refuse."""
    done = worker_refusing_to_start({"SAGA_PROVIDERS": json.dumps({"payments": {"bogus": 1}})})
    assert done.returncode == 2, done.stderr[-3000:]
    assert "refusing to start: SAGA_PROVIDERS['payments']: unknown knob 'bogus'" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout
