"""The saga admin: list, filters, search, the read-only saga page, the dashboard, and scale.

Sagas are built directly in the database (tests/admin/conftest.py); the operations are
tested in test_saga_actions.py.
"""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from inventory.models import Product, Reservation, ReservationLine
from payments.models import Payment
from sagas.admin import EstimatedCountPaginator
from sagas.models import Saga, SagaEvent, SagaState
from shipping.models import Shipment
from tests.admin.conftest import make_saga, needs_manual, running, stuck

pytestmark = pytest.mark.django_db

LIST = "/admin/sagas/saga/"


def page_url(saga: Saga) -> str:
    return reverse("admin:sagas_saga_change", args=[saga.pk])


def listed_ids(response) -> list[str]:
    """Saga ids of the list's rows, in display order."""
    return listed_ids_in(response.content.decode())


def listed_ids_in(html: str) -> list[str]:
    return re.findall(r'/admin/sagas/saga/([0-9a-f-]{36})/change/"', html)


def sql(ctx) -> list[str]:
    return [q["sql"] for q in ctx.captured_queries]


# ---------------------------------------------------------------------------------------------
# The list
# ---------------------------------------------------------------------------------------------
def test_list_shows_what_support_needs_newest_first(ops_client):
    """Type, state, step, attempts, short last error, age and the order link, newest first."""
    old = make_saga(age=timedelta(days=3), with_order=True)
    failed = needs_manual(age=timedelta(hours=2), last_error="x" * 300)
    new = stuck(with_order=True)
    response = ops_client.get(LIST)
    assert response.status_code == 200
    assert listed_ids(response) == [str(new.pk), str(failed.pk), str(old.pk)]
    html = response.content.decode()
    assert "needs manual" in html and "undo of <strong>s1</strong> failed" in html
    assert "at <strong>s3</strong>" in html
    assert 'class="saga-stuck"' in html  # the stuck saga is marked
    assert "x" * 69 + "..." in html and "x" * 80 + "<" not in html  # error shortened
    assert f"/admin/orders/order/{old.order.pk}/change/" in html
    assert "3\xa0days" in html or "3 days" in html


def test_attempt_column_counts_the_step_in_hand_and_is_blank_once_done(ops_client):
    """The engine sets ``attempt`` back to 0 when a saga finishes: the list shows no count for
    a finished saga instead of a "0" that reads as "never tried", and the real count for one
    still working or waiting for a person."""
    done = make_saga(age=timedelta(minutes=3))
    undone = make_saga(state=SagaState.COMPENSATED, failure_code="no", age=timedelta(minutes=2))
    stopped = needs_manual(attempt=5, age=timedelta(minutes=1))
    retrying = running()
    html = ops_client.get(LIST).content.decode()
    cells = re.findall(r'<td class="field-attempt_column">(.*?)</td>', html, re.S)
    assert len(cells) == 4, cells
    shown = dict(zip(listed_ids_in(html), cells, strict=True))
    assert shown[str(done.pk)] == shown[str(undone.pk)] == "-"
    assert re.fullmatch(
        r'<span title="attempts of the undo in hand">5</span>', shown[str(stopped.pk)]
    )
    assert re.fullmatch(
        r'<span title="attempts of the step in hand">2</span>', shown[str(retrying.pk)]
    )


def test_filters_by_state_type_failed_step_signature_and_stuck(ops_client):
    """Each filter keeps exactly the sagas it names."""
    done = make_saga()
    manual = needs_manual()
    other_sig = needs_manual(failure_code="other")
    late = stuck()
    fresh = running()
    order_saga = make_saga(saga_type="order", with_order=True)

    def ids(query: str) -> set[str]:
        response = ops_client.get(f"{LIST}?{query}")
        assert response.status_code == 200, query
        return set(listed_ids(response))

    assert ids("state__exact=needs_manual") == {str(manual.pk), str(other_sig.pk)}
    assert ids("state__exact=succeeded") == {str(done.pk), str(order_saga.pk)}
    assert ids("saga_type=order") == {str(order_saga.pk)}
    assert ids("failed_step=s1") == {str(manual.pk), str(other_sig.pk)}
    assert ids("signature=s1:no") == {str(manual.pk)}
    assert ids("stuck=yes") == {str(late.pk)}
    assert str(fresh.pk) not in ids("stuck=yes")


def test_filter_choices_come_from_definitions_not_distinct_scans(ops_client):
    """Type and step choices are the registered definitions'; no SELECT DISTINCT runs."""
    make_saga()
    with CaptureQueriesContext(connection) as ctx:
        response = ops_client.get(LIST)
    html = response.content.decode()
    assert "?saga_type=order" in html and "?failed_step=reserve_inventory" in html
    assert not [q for q in sql(ctx) if "DISTINCT" in q.upper()]


def test_search_is_exact_by_saga_id_order_id_and_correlation_id(ops_client):
    """A whole saga id, order id or correlation id finds its saga; fragments find nothing."""
    a = make_saga(saga_type="order", with_order=True)
    b = make_saga(correlation_id="req-42")
    make_saga()

    def found(term: str) -> list[str]:
        with CaptureQueriesContext(connection) as ctx:
            response = ops_client.get(LIST, {"q": term})
        assert response.status_code == 200
        assert not [q for q in sql(ctx) if "LIKE" in q.upper()], "search must not scan"
        return listed_ids(response)

    assert found(str(a.pk)) == [str(a.pk)]
    assert found(f"  {str(a.order.pk).upper()} ") == [str(a.pk)]
    assert found("req-42") == [str(b.pk)]
    assert found(str(a.pk)[:8]) == []
    assert found("req") == []


def test_date_hierarchy_offers_the_days_between_first_and_last(ops_client):
    """The date drill-down is built from the first and last date, without a DISTINCT scan."""
    make_saga(age=timedelta(days=1))
    make_saga()
    with CaptureQueriesContext(connection) as ctx:
        response = ops_client.get(LIST)
    assert response.status_code == 200
    assert "created_at__year=" in response.content.decode()
    assert not [q for q in sql(ctx) if "DISTINCT" in q.upper()]


# ---------------------------------------------------------------------------------------------
# The saga page
# ---------------------------------------------------------------------------------------------
def test_saga_page_shows_failure_steps_timeline_and_related_records(ops_client):
    """What failed and why, each step with keys and results, the timeline oldest first with
    actor and duration, and links to the order, payment, reservation and shipment."""
    saga = needs_manual(saga_type="order", failed_step="authorize_payment", with_order=True)
    order = saga.order
    payment = Payment.objects.create(order_id=order.pk, currency="EUR", amount=24)
    product = Product.objects.create(sku="SR-X", name="x", price=1, stock_on_hand=5)
    reservation = Reservation.objects.create(
        key=f"saga:{saga.pk}:reserve_inventory", order_id=order.pk
    )
    ReservationLine.objects.create(reservation=reservation, product=product, quantity=1)
    shipment = Shipment.objects.create(
        key=f"saga:{saga.pk}:arrange_shipment", order_id=order.pk, status="arranged"
    )
    SagaEvent.objects.create(
        saga=saga, at=saga.created_at, kind="ops_retry", actor="user:someone", detail="retry now"
    )
    response = ops_client.get(page_url(saga))
    assert response.status_code == 200
    html = response.content.decode()
    assert "the compensation of authorize_payment" in html
    assert "compensation failed: ConnectionError: provider down" in html
    assert f"saga:{saga.pk}:reserve_inventory" in html  # step keys
    timeline = html[html.index('id="timeline"') :]
    assert timeline.index("Saga started") < timeline.index("Operator: retry now")
    assert "user:someone" in timeline and "2.5 ms" in timeline
    for obj in (order, payment, reservation, shipment):
        opts = obj._meta
        assert f"/admin/{opts.app_label}/{opts.model_name}/{obj.pk}/change/" in html
    # Read-only: no save button, and a POST changes nothing.
    assert 'name="_save"' not in html
    before = Saga.objects.values().get(pk=saga.pk)
    assert ops_client.post(page_url(saga), {"state": "resolved"}).status_code == 403
    assert Saga.objects.values().get(pk=saga.pk) == before


def test_saga_page_links_to_sagas_with_the_same_failure_signature(ops_client):
    """A failed saga links to the list of sagas failed at the same step with the same code."""
    saga = needs_manual()
    needs_manual()
    needs_manual(failure_code="different")
    html = ops_client.get(page_url(saga)).content.decode()
    assert "?signature=s1:no&amp;state__exact=needs_manual" in html
    response = ops_client.get(f"{LIST}?signature=s1:no&state__exact=needs_manual")
    assert len(listed_ids(response)) == 2


def test_stuck_saga_page_explains_stuck_and_the_failing_step(ops_client):
    """A stuck running saga says it is stuck, which step keeps failing and with what error."""
    saga = stuck()
    html = ops_client.get(page_url(saga)).content.decode()
    assert "Failing step:</strong> s3 (attempt 2, still being retried)" in html
    assert "scripted transient error at s3" in html
    assert "No progress for over" in html


@pytest.mark.parametrize(
    ("state", "step_index"),
    [(SagaState.SUCCEEDED, 2), (SagaState.RUNNING, 1), (SagaState.COMPENSATED, 0)],
)
def test_a_wait_that_timed_out_before_the_pivot_is_not_called_past_it(
    ops_client, state, step_index
):
    """After a person took it up (sent the signal, retried, compensated): the wait came
    before the point of no return, whatever the saga did next."""
    saga = make_saga(
        saga_type="test_wait_escalate",
        state=state,
        step_index=step_index,
        failed_step="await_go",
        failure_code="timed_out",
        escalated_from=SagaState.RUNNING,
    )
    html = ops_client.get(page_url(saga)).content.decode()
    assert "Wait timed out:</strong> await_go got no answer in time" in html
    assert "after the point of no return" not in html


def test_a_step_that_failed_past_the_pivot_is_called_so(ops_client):
    saga = make_saga(
        saga_type="test_pivot",
        state=SagaState.NEEDS_MANUAL,
        step_index=4,
        failed_step="s5",
        failure_code="step_failed",
        escalated_from=SagaState.RUNNING,
    )
    html = ops_client.get(page_url(saga)).content.decode()
    assert "s5, after the point of no return" in html


# ---------------------------------------------------------------------------------------------
# Dashboard and index
# ---------------------------------------------------------------------------------------------
def test_index_links_to_the_dashboard_with_the_urgent_numbers(ops_client):
    """The admin index shows the stuck and needs-a-person counts and links to the dashboard."""
    stuck()
    needs_manual()
    needs_manual()
    html = ops_client.get("/admin/").content.decode()
    assert reverse("admin:sagas_saga_dashboard") in html
    panel = html[html.index('id="ops-overview"') :]
    assert re.search(r"Stuck</strong><span class=\"number\">1<", panel)
    assert re.search(r"Needs a person</strong><span class=\"number\">2<", panel)


def test_dashboard_counts_states_stuck_and_failure_signatures(ops_client):
    """Counts per state, the stuck count and the top failure signatures of 24h, linked."""
    for _ in range(3):
        needs_manual()
    make_saga(state=SagaState.COMPENSATED, failed_step="s2", failure_code="declined")
    make_saga(
        state=SagaState.COMPENSATED,
        failed_step="s2",
        failure_code="declined",
        age=timedelta(days=2),
    )
    stuck()
    make_saga()
    response = ops_client.get(reverse("admin:sagas_saga_dashboard"))
    assert response.status_code == 200
    html = response.content.decode()
    states = {s["state"]: s["count"].value for s in response.context["states"]}
    assert states == {
        "running": 1,
        "compensating": 0,
        "succeeded": 1,
        "compensated": 2,
        "needs_manual": 3,
        "resolved": 0,
    }
    assert response.context["stuck"].value == 1
    sigs = [
        (s["failed_step"], s["failure_code"], s["count"]) for s in response.context["signatures"]
    ]
    assert sigs == [("s1", "no", 3), ("s2", "declined", 1)]  # the 2-day-old one is out
    assert f"{LIST}?signature=s1:no" in html
    assert f"{LIST}?stuck=yes" in html


def test_sagas_waiting_for_a_staff_signal_are_counted_on_the_index_and_the_dashboard(ops_client):
    """An order parked for ops' fraud review waits for someone in this console, yet showed
    only as "running": neither the index nor the dashboard said anyone was waited for. Both
    count such sagas now, linked to the list of them; a wait for the client's own signal (3-D
    Secure) is not staff's to answer, so it is not counted."""
    from django.utils import timezone

    from orders.saga import order_saga
    from tests.admin.conftest import running

    waits = {}
    for signal in ("fraud_review", "3ds_confirmed"):
        saga = running(saga_type="order", step_index=order_saga.index_of("fraud_review"))
        Saga.objects.filter(pk=saga.pk).update(
            waiting_for=signal, waiting_since=timezone.now(), next_attempt_at=None
        )
        waits[signal] = saga
    link = f"{LIST}?waiting_for=*staff"

    panel = ops_client.get("/admin/").content.decode()
    panel = panel[panel.index('id="ops-overview"') :]
    assert re.search(r"Waiting for staff</strong><span class=\"number\">1<", panel), panel
    assert link in panel
    dashboard = ops_client.get(reverse("admin:sagas_saga_dashboard"))
    assert dashboard.context["staff_waits"].value == 1
    assert link in dashboard.content.decode()
    listed = ops_client.get(link).context["cl"].result_list
    assert [s.pk for s in listed] == [waits["fraud_review"].pk]


def test_dashboard_needs_view_permission(client, django_user_model):
    """Staff without the saga view permission cannot open the dashboard."""
    user = django_user_model.objects.create_user("nobody", password="pw", is_staff=True)
    client.force_login(user)
    assert client.get(reverse("admin:sagas_saga_dashboard")).status_code == 403


# ---------------------------------------------------------------------------------------------
# Scale: no full counts, constant queries per page
# ---------------------------------------------------------------------------------------------
def _queries(client, url: str) -> int:
    with CaptureQueriesContext(connection) as ctx:
        response = client.get(url)
    assert response.status_code == 200, url
    return len(ctx.captured_queries)


def test_query_count_per_page_stays_constant_as_rows_grow(ops_client):
    """The list (plain, filtered, searched), a saga page and the dashboard run the same number
    of queries with 5 sagas as with 60, and with 3 timeline events as with 40."""
    for _ in range(5):
        make_saga(saga_type="order", with_order=True)
        needs_manual()
    stuck(with_order=True)
    probe = needs_manual(saga_type="order", failed_step="authorize_payment", with_order=True)
    urls = [
        LIST,
        f"{LIST}?state__exact=needs_manual",
        f"{LIST}?stuck=yes",
        f"{LIST}?signature=s1:no",
        f"{LIST}?q={probe.pk}",
        reverse("admin:sagas_saga_dashboard"),
        "/admin/",
        "/admin/orders/order/",
    ]
    before = {url: _queries(ops_client, url) for url in urls}
    page_before = _queries(ops_client, page_url(probe))
    for _ in range(25):
        make_saga(saga_type="order", with_order=True)
        needs_manual()
        stuck(with_order=False)
    SagaEvent.objects.bulk_create(
        SagaEvent(saga=probe, at=probe.created_at, kind="step_retry", step="s1", attempt=k)
        for k in range(40)
    )
    after = {url: _queries(ops_client, url) for url in urls}
    assert after == before
    assert _queries(ops_client, page_url(probe)) == page_before


def test_unfiltered_list_uses_the_table_estimate_instead_of_count(ops_client, monkeypatch):
    """Above the exact-count threshold the list reads pg_class.reltuples, runs no COUNT(*) over
    the table and says "about"; filtered lists count at most cap + 1 rows."""
    for _ in range(3):
        make_saga()
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE sagas_saga")
    monkeypatch.setattr(EstimatedCountPaginator, "exact_below", 0)
    with CaptureQueriesContext(connection) as ctx:
        response = ops_client.get(LIST)
    assert response.status_code == 200
    statements = sql(ctx)
    assert not [q for q in statements if q.upper().startswith("SELECT COUNT(*)")]
    assert [q for q in statements if "reltuples" in q]
    assert "(estimated)" in response.content.decode()

    monkeypatch.setattr(EstimatedCountPaginator, "filtered_cap", 2)
    with CaptureQueriesContext(connection) as ctx:
        response = ops_client.get(f"{LIST}?state__exact=succeeded")
    counts = [q for q in sql(ctx) if q.upper().startswith("SELECT COUNT(*)")]
    assert counts and all("LIMIT 3" in q for q in counts)
    assert "about" in response.content.decode()


def test_pages_past_an_estimated_end_are_empty_not_errors(ops_client, monkeypatch):
    """With an estimated count, a page number past the real end shows an empty page."""
    from sagas.admin import SagaAdmin

    for _ in range(3):
        make_saga()
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE sagas_saga")
    monkeypatch.setattr(EstimatedCountPaginator, "exact_below", 0)
    monkeypatch.setattr(SagaAdmin, "list_per_page", 1)
    assert len(listed_ids(ops_client.get(f"{LIST}?p=2"))) == 1
    response = ops_client.get(f"{LIST}?p=9")
    assert response.status_code == 200
    assert listed_ids(response) == []


def test_a_saga_with_nothing_to_do_now_is_not_called_finished(ops_client):
    """No button to offer is not the same as finished: an order waiting at its fraud review
    with its client's cancel pending, and a saga waiting out a timer at its pivot, say what
    they are doing; a finished saga says it is finished."""
    from django.utils import timezone

    from orders.saga import order_saga
    from sagas.models import Saga, SagaState
    from tests.admin.conftest import make_saga, running

    def hint(saga: Saga) -> str:
        html = ops_client.get(reverse("admin:sagas_saga_change", args=[saga.pk])).content.decode()
        assert 'value="Retry now"' not in html and 'value="Compensate..."' not in html
        at = html.index("Nothing to do")
        return html[at : html.index("</span>", at)]

    cancelling = running(saga_type="order", step_index=order_saga.index_of("fraud_review"))
    Saga.objects.filter(pk=cancelling.pk).update(
        waiting_for="fraud_review",
        waiting_since=timezone.now(),
        next_attempt_at=timezone.now(),
        cancel_reason="customer_cancelled",
    )
    said = hint(cancelling)
    assert "finished" not in said and "a cancel is in progress (customer_cancelled)" in said

    timer = make_saga(state=SagaState.RUNNING, saga_type="test_sleep_pivot", step_index=1)
    Saga.objects.filter(pk=timer.pk).update(
        waiting_since=timezone.now(), next_attempt_at=timezone.now() + timedelta(hours=1)
    )
    said = hint(timer)
    assert "finished" not in said and "waits for its timer" in said

    assert "this saga is finished" in hint(make_saga())


def test_a_saga_whose_signal_was_accepted_says_so_not_that_it_waits_for_its_timer(ops_client):
    """Accepting a signal clears ``waiting_for`` and makes the saga due now, but it stands at
    its wait until a worker takes the signal: its page said "Waiting for its timer ... times
    out at <now>" and offered to send a signal that would be refused as already waiting."""
    from django.utils import timezone

    from orders.saga import order_saga
    from sagas.models import Saga, SagaSignal
    from tests.admin.conftest import running

    now = timezone.now()
    saga = running(saga_type="order", step_index=order_saga.index_of("fraud_review"))
    Saga.objects.filter(pk=saga.pk).update(
        definition_version=order_saga.version,  # the version whose steps make_saga gave it
        waiting_for="",
        waiting_since=now,
        next_attempt_at=now,
    )
    SagaSignal.objects.create(
        saga=saga, name="fraud_review", key="k1", payload={"approved": True}, received_at=now
    )
    html = ops_client.get(reverse("admin:sagas_saga_change", args=[saga.pk])).content.decode()
    assert "Signal fraud_review received</strong>" in html
    assert "its timer" not in html and "Kept for later" not in html
    assert "Send a signal" not in html


def test_waiting_for_staff_is_judged_per_saga_type(ops_client, monkeypatch):
    """One type's staff-only signal may be another type's client-facing one of the same name:
    a saga of the second type, waiting for its client, is not waiting for staff."""
    from django.utils import timezone

    from sagas import selectors
    from sagas.definition import SagaDefinition, Wait
    from tests.sagas.sagatypes import scripted

    staff = SagaDefinition("staff_go", steps=[*scripted(["s1"]), Wait("go", timeout=60)])
    client = SagaDefinition(
        "client_go", steps=[*scripted(["s1"]), Wait("go", timeout=60, client=lambda _: 1)]
    )
    monkeypatch.setattr(selectors, "registered_definitions", lambda: [staff, client])
    parked = {}
    for kind in ("staff_go", "client_go"):
        saga = make_saga(state=SagaState.RUNNING, step_index=1)
        Saga.objects.filter(pk=saga.pk).update(
            saga_type=kind, waiting_for="go", waiting_since=timezone.now()
        )
        parked[kind] = saga.pk
    found = Saga.objects.filter(selectors.saga_waiting_for_staff_q())
    assert list(found.values_list("pk", flat=True)) == [parked["staff_go"]]
