"""The webhooks app's system check of WEBHOOKS_RESPONSE_EXCERPT: ``manage.py check`` (and so
``migrate`` and ``runserver``) refuses a value the delivery's column cannot hold."""

from __future__ import annotations

import pytest
from django.core.management import call_command
from django.core.management.base import SystemCheckError

from webhooks.models import Delivery

COLUMN = Delivery._meta.get_field("response_excerpt").max_length  # the column, as migrated


@pytest.mark.parametrize("value", [COLUMN + 1, -1])
def test_an_excerpt_the_column_cannot_hold_fails_the_check(settings, value):
    settings.WEBHOOKS_RESPONSE_EXCERPT = value
    with pytest.raises(SystemCheckError) as failed:
        call_command("check", tags=["webhooks"])
    assert "webhooks.E001" in str(failed.value)
    assert f"from 0 to {COLUMN}" in str(failed.value)


@pytest.mark.parametrize("value", [0, 200, COLUMN])
def test_an_excerpt_the_column_holds_passes_the_check(settings, value):
    settings.WEBHOOKS_RESPONSE_EXCERPT = value
    call_command("check", tags=["webhooks"])
