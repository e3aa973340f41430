"""``generate_sagas`` (the bulk data set) and ``admin_bench`` (the console's page timings)."""

from __future__ import annotations

import io
import json
import re

import pytest
from django.core.management import call_command
from django.db import connection
from django.db.models import Count

from orders.models import Order, OrderItem
from sagas.models import Saga, SagaEvent, SagaStep
from sagas.selectors import sagas_stuck

pytestmark = pytest.mark.django_db

TABLES = ("sagas_saga", "sagas_sagastep", "sagas_sagaevent", "orders_order", "orders_orderitem")


def schema() -> set[tuple[str, str]]:
    """Every index and constraint of the generated tables, by name and definition."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = ANY(%s)",
            [list(TABLES)],
        )
        # Recreated definitions may spell a cast differently; compare without casts.
        found = {(name, re.sub(r"::[a-z ]+(\[\])?|[()\s]", "", d)) for name, d in cursor.fetchall()}
        cursor.execute(
            "SELECT conname, contype::text FROM pg_constraint WHERE conrelid = ANY(%s::regclass[])",
            [list(TABLES)],
        )
        return found | set(cursor.fetchall())


def test_generate_sagas_writes_a_consistent_data_set_and_restores_the_schema():
    """N sagas with exactly E events each, five steps each, an order per order saga, a mix of
    states including stuck ones; the indexes dropped for the load are all back."""
    before = schema()
    out = io.StringIO()
    call_command(
        "generate_sagas", sagas=400, events_per_saga=7, seed=11, no_vacuum=True, stdout=out
    )
    assert "Done: 400 sagas" in out.getvalue()
    assert schema() == before
    assert Saga.objects.count() == 400
    assert SagaStep.objects.count() == 400 * 5
    per_saga = set(
        SagaEvent.objects.values("saga_id").annotate(n=Count("id")).values_list("n", flat=True)
    )
    assert per_saga == {7}
    order_sagas = Saga.objects.filter(saga_type="order")
    assert Order.objects.count() == order_sagas.count() == OrderItem.objects.count()
    assert not order_sagas.filter(order__isnull=True).exists()
    states = set(Saga.objects.values_list("state", flat=True))
    assert {"succeeded", "compensated", "running"} <= states
    assert sagas_stuck().exists()
    # Ids and sequences line up: the ORM can add rows after a load.
    SagaEvent.objects.create(
        saga=Saga.objects.first(), at=Saga.objects.first().created_at, kind="x"
    )


def test_admin_bench_measures_every_page_on_generated_data():
    """admin_bench renders every page it lists with status 200 and reports its queries."""
    call_command("generate_sagas", sagas=300, seed=5, no_vacuum=True, stdout=io.StringIO())
    out = io.StringIO()
    call_command("admin_bench", repeat=1, json=True, stdout=out)
    results = json.loads(out.getvalue())
    pages = {r["page"] for r in results}
    assert {"saga list", "saga list, stuck", "saga search: order id", "saga dashboard"} <= pages
    assert any(p.startswith("saga page") for p in pages)
    assert [r["page"] for r in results if r["status"] != 200] == []
    assert [r["page"] for r in results if not 0 < r["queries"] < 25] == []


def test_generate_sagas_refuses_nonsense_sizes():
    """Zero sagas or events is refused with a message."""
    from django.core.management.base import CommandError

    with pytest.raises(CommandError):
        call_command("generate_sagas", sagas=0, stdout=io.StringIO())
