"""A closing breaker brings the sagas parked on it back, with a real worker.

The sagas park on a forced-open breaker whose cool-down (and ``park_max``) is ten minutes, so
without the wake-up they would not look again within this test's deadline. The in-process
details (who is rung, who is not) are in ``test_provider_seam.py``.
"""

from __future__ import annotations

import json

import pytest
from django.db import transaction

from providers import breaker
from sagas.models import Saga, SagaState
from sagas.services import saga_start
from tests.sagas.sagatypes import ensure_effects_table

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True)]

SLOW_CARD = {"card": {"cooldown": 600, "park_max": 600, "release_spread": 0.5}}


def test_sagas_parked_through_an_outage_go_on_as_soon_as_the_breaker_closes(
    worker_factory, wait_for, settings
):
    ensure_effects_table()
    settings.SAGA_PROVIDERS = SLOW_CARD
    breaker._known_breakers.clear()
    worker_factory({"SAGA_PROVIDERS": json.dumps(SLOW_CARD)}, name="wake", exclusive=True)
    breaker.force("card", "open", user=None)
    with transaction.atomic():
        ids = [saga_start(saga_type="test_provider", data={"script": {}}).id for _ in range(3)]

    parked = Saga.objects.filter(id__in=ids, parked_on="card", current_step="s2")
    wait_for(
        lambda: parked.count() == 3,
        timeout=60,
        describe=lambda: list(
            Saga.objects.filter(id__in=ids).values("state", "current_step", "parked_on", "version")
        ),
    )

    breaker.force("card", "closed", user=None)
    done = Saga.objects.filter(id__in=ids, state=SagaState.SUCCEEDED)
    wait_for(
        lambda: done.count() == 3,
        timeout=60,
        describe=lambda: list(
            Saga.objects.filter(id__in=ids).values("state", "current_step", "next_attempt_at")
        ),
    )
