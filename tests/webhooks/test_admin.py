"""The ops console: endpoints and deliveries, redelivery (permissioned, audited), the index's
dead-delivery count, and the retention purge and sweep."""

from __future__ import annotations

import logging
import uuid
from datetime import timedelta

import pytest
from django.contrib.auth.models import Permission, User
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from audit.models import AuditEntry
from webhooks.delivery import purge, sweep
from webhooks.models import Delivery, DeliveryStatus, Endpoint, Event

pytestmark = pytest.mark.django_db

VIEW = ["view_endpoint", "change_endpoint", "view_delivery", "view_event"]


def _staff(username: str, codenames: list[str]) -> User:
    user = User.objects.create_user(username, password="pw", is_staff=True)
    user.user_permissions.add(
        *Permission.objects.filter(content_type__app_label="webhooks", codename__in=codenames)
    )
    return User.objects.get(pk=user.pk)


def _delivery(
    endpoint: Endpoint,
    *,
    status: str,
    age: timedelta = timedelta(0),
    subject: uuid.UUID | None = None,
    sequence: int = 1,
) -> Delivery:
    subject = subject or uuid.uuid4()
    created = timezone.now() - age
    event = Event.objects.create(
        owner=endpoint.owner,
        type="order.confirmed",
        subject=subject,
        sequence=sequence,
        body="{}",
        created_at=created,
    )
    return Delivery.objects.create(
        event=event,
        endpoint=endpoint,
        subject=subject,
        sequence=sequence,
        status=status,
        attempts=7 if status == DeliveryStatus.DEAD else 1,
        next_attempt_at=created,
        retry_until=created + timedelta(days=1),
        last_status_code=500 if status == DeliveryStatus.DEAD else 200,
        last_error="HTTP 500" if status == DeliveryStatus.DEAD else "",
    )


@pytest.fixture
def endpoint(django_user_model) -> Endpoint:
    owner = django_user_model.objects.create_user("shop")
    return Endpoint.objects.create(
        owner=owner, url="https://93.184.215.14/h", events=["order.confirmed"], secret="whsec_x"
    )


def test_staff_see_deliveries_and_the_index_counts_the_dead(client, endpoint):
    _delivery(endpoint, status=DeliveryStatus.DEAD)
    _delivery(endpoint, status=DeliveryStatus.DELIVERED)
    client.force_login(_staff("vic", VIEW))
    index = client.get("/admin/").content.decode()
    assert 'id="card-dead-deliveries"' in index
    assert '<span class="number">1</span>' in index.split('id="card-dead-deliveries"')[1]
    page = client.get(f"/admin/webhooks/delivery/?endpoint__id__exact={endpoint.pk}")
    assert page.status_code == 200
    assert "HTTP 500" in page.content.decode()
    assert client.get("/admin/webhooks/endpoint/").status_code == 200


@pytest.mark.parametrize(
    ("lookup", "right", "wrong"),
    [
        ("secret__startswith", "whsec_A", "whsec_B"),
        ("secret__gt", "whsec_", "whsec_~"),
        ("secret", "whsec_Abc", "whsec_Abd"),
        ("previous_secrets__icontains", "whsec_Old", "whsec_New"),
        ("owner__password__startswith", "!", "pbkdf2"),
    ],
)
def test_the_endpoint_list_filters_by_no_secret(client, endpoint, lookup, right, wrong):
    """Staff who may only look at endpoints cannot read a secret through URL filters: a
    filter on a secret is refused whether the guess is right or wrong, never a list that
    holds the endpoint only when it is right."""
    endpoint.secret = "whsec_Abc"
    endpoint.previous_secrets = [{"secret": "whsec_Old", "expires_at": "2999-01-01T00:00:00"}]
    endpoint.save()
    client.force_login(_staff("vic", ["view_endpoint"]))
    answers = [client.get("/admin/webhooks/endpoint/", {lookup: guess}) for guess in (right, wrong)]
    assert [a.status_code for a in answers] == [400, 400]
    assert all(endpoint.url.encode() not in a.content for a in answers)


def test_a_refused_filter_is_logged_as_one_warning_without_a_traceback(client, endpoint, caplog):
    """The 400 is the client's mistake (or a probe): one WARNING naming the refusal and the
    page, not Django's ERROR with a traceback; the guessed value is not in it."""
    client.force_login(_staff("vic", ["view_endpoint"]))
    with caplog.at_level(logging.INFO, logger="django"):
        answer = client.get("/admin/webhooks/endpoint/", {"secret__startswith": "whsec_guess"})
    assert answer.status_code == 400
    records = [r for r in caplog.records if r.name.startswith("django.")]
    assert [(r.name, r.levelname, r.getMessage(), r.exc_info) for r in records] == [
        (
            "django.security.DisallowedModelAdminLookup",
            "WARNING",
            "DisallowedModelAdminLookup: Filtering by secret__startswith not allowed; answered "
            "400 Bad Request to GET /admin/webhooks/endpoint/",
            None,
        )
    ]


def test_django_records_are_written_by_the_projects_handler_only():
    """Django's own console handler printed each ``django.*`` record a second time under
    DEBUG (plain text, traceback and all); only the root's handler writes them now."""
    logger: logging.Logger | None = logging.getLogger("django.security.DisallowedModelAdminLookup")
    handlers = []
    while logger is not None and logger.name != "root":
        handlers += logger.handlers
        logger = logger.parent if logger.propagate else None
    assert handlers == []


def test_the_endpoint_lists_own_filters_and_search_still_work(client, endpoint):
    client.force_login(_staff("vic", ["view_endpoint"]))
    listed = client.get("/admin/webhooks/endpoint/", {"is_active__exact": "1", "q": "shop"})
    assert listed.status_code == 200
    assert endpoint.url.encode() in listed.content
    none = client.get("/admin/webhooks/endpoint/", {"is_active__exact": "0"})
    assert none.status_code == 200
    assert endpoint.url.encode() not in none.content


def test_redelivering_needs_the_permission_and_is_recorded(client, endpoint):
    dead = _delivery(endpoint, status=DeliveryStatus.DEAD)
    client.force_login(_staff("vic", VIEW))
    client.post(
        "/admin/webhooks/delivery/",
        {"action": "redeliver", "_selected_action": [dead.pk]},
    )
    dead.refresh_from_db()
    assert dead.status == DeliveryStatus.DEAD  # the action is not even offered to vic

    client.force_login(_staff("olga", [*VIEW, "redeliver_delivery"]))
    response = client.post(
        "/admin/webhooks/endpoint/",
        {"action": "redeliver_dead", "_selected_action": [endpoint.pk]},
    )
    assert response.status_code == 302
    dead.refresh_from_db()
    assert dead.status == DeliveryStatus.PENDING and dead.attempts == 0
    assert dead.retry_until > timezone.now() + timedelta(hours=23)
    entry = AuditEntry.objects.get(action="webhook_redeliver")
    assert entry.actor_name == "olga" and entry.detail == {"deliveries": [dead.pk]}
    assert str(endpoint.pk) in entry.target


def test_staff_with_the_permission_redeliver_one_dead_delivery(client, endpoint):
    chosen, other = (_delivery(endpoint, status=DeliveryStatus.DEAD) for _ in range(2))
    client.force_login(_staff("olga", [*VIEW, "redeliver_delivery"]))
    response = client.post(
        "/admin/webhooks/delivery/", {"action": "redeliver", "_selected_action": [chosen.pk]}
    )
    assert response.status_code == 302
    chosen.refresh_from_db()
    other.refresh_from_db()
    assert (chosen.status, chosen.attempts) == (DeliveryStatus.PENDING, 0)
    assert other.status == DeliveryStatus.DEAD
    entry = AuditEntry.objects.get(action="webhook_redeliver")
    assert entry.actor_name == "olga" and entry.detail == {"deliveries": [chosen.pk]}


def test_staff_disable_an_endpoint_and_its_new_events_are_held_for_it_until_enabled(
    client, endpoint, settings
):
    """Switched off, the endpoint still gets a delivery for each event it subscribed to,
    neither claimed nor rung while off; switched back on, the held delivery is due at once with
    a full retry window from then, so the time it was held cannot make it dead."""
    from webhooks.delivery import claim_next
    from webhooks.services import event_emit

    client.force_login(_staff("vic", VIEW))
    client.post(
        "/admin/webhooks/endpoint/", {"action": "disable", "_selected_action": [endpoint.pk]}
    )
    endpoint.refresh_from_db()
    assert not endpoint.is_active and "vic" in endpoint.disabled_reason
    assert AuditEntry.objects.get(action="webhook_disable").actor_name == "vic"
    event = event_emit(
        owner_id=endpoint.owner_id, subject=uuid.uuid4(), type="order.confirmed", data={}
    )
    assert event is not None and event.sequence == 1
    held = Delivery.objects.get(event=event, endpoint=endpoint)
    assert held.status == DeliveryStatus.PENDING
    assert claim_next(endpoint.pk) is None
    # Held for longer than its retry window, and overdue for the sweeper: still not rung.
    long_ago = timezone.now() - timedelta(days=3)
    Delivery.objects.filter(pk=held.pk).update(next_attempt_at=long_ago, retry_until=long_ago)
    assert sweep() == 0

    client.post(
        "/admin/webhooks/endpoint/", {"action": "enable", "_selected_action": [endpoint.pk]}
    )
    held.refresh_from_db()
    assert held.status == DeliveryStatus.PENDING and held.next_attempt_at <= timezone.now()
    window = timedelta(seconds=settings.WEBHOOKS_RETRY_FOR)
    assert held.retry_until > timezone.now() + window - timedelta(minutes=1)
    claimed = claim_next(endpoint.pk)
    assert claimed is not None and claimed[0].pk == held.pk


def test_purge_deletes_old_delivered_events_in_batches_and_keeps_the_rest(endpoint, settings):
    settings.WEBHOOKS_PURGE_BATCH = 2
    settings.WEBHOOKS_RETENTION_DAYS = 7
    old = [
        _delivery(endpoint, status=DeliveryStatus.DELIVERED, age=timedelta(days=8))
        for _ in range(5)
    ]
    old_dead = _delivery(endpoint, status=DeliveryStatus.DEAD, age=timedelta(days=8))
    recent = _delivery(endpoint, status=DeliveryStatus.DELIVERED, age=timedelta(days=1))
    with CaptureQueriesContext(connection) as queries:
        assert purge() == 5
    event_table = Event._meta.db_table
    deletes = [q["sql"] for q in queries if q["sql"].startswith(f'DELETE FROM "{event_table}"')]
    assert len(deletes) == 3  # 2 + 2 + 1: a transaction per batch
    assert not Event.objects.filter(pk__in=[d.event_id for d in old]).exists()
    assert set(Event.objects.values_list("pk", flat=True)) == {old_dead.event_id, recent.event_id}


def test_sweep_rings_only_endpoints_with_overdue_unleased_deliveries(endpoint):
    due = _delivery(endpoint, status=DeliveryStatus.PENDING, age=timedelta(minutes=5))
    _delivery(endpoint, status=DeliveryStatus.DELIVERED, age=timedelta(minutes=5))
    assert sweep() == 1
    Delivery.objects.filter(pk=due.pk).update(lease_until=timezone.now() + timedelta(minutes=1))
    assert sweep() == 0  # a worker holds it
    Delivery.objects.filter(pk=due.pk).update(lease_until=None, next_attempt_at=timezone.now())
    assert sweep() == 0  # its doorbell may still be on its way
    Endpoint.objects.filter(pk=endpoint.pk).update(is_active=False)
    Delivery.objects.filter(pk=due.pk).update(next_attempt_at=timezone.now() - timedelta(hours=1))
    assert sweep() == 0  # disabled: its deliveries wait


def test_sweep_passes_over_endpoints_with_nothing_sendable_to_reach_one_that_lost_its_doorbell(
    endpoint, settings, monkeypatch
):
    """An endpoint whose overdue deliveries wait behind an earlier one of the same order (in
    its backoff, up to an hour) or behind an attempt in flight has nothing a claim would send:
    the sweep does not ring it, so a full batch of such endpoints cannot keep it from ringing
    one whose doorbell was lost; and the longest overdue is rung first."""
    from webhooks import delivery as webhook_delivery
    from webhooks.delivery import claim_next

    settings.WEBHOOKS_SWEEP_BATCH = 1
    rung: list = []
    monkeypatch.setattr(webhook_delivery, "ring", lambda endpoint_id, **_: rung.append(endpoint_id))
    later = Endpoint.objects.create(
        owner=endpoint.owner, url="https://93.184.215.14/b", events=["order.confirmed"], secret="s"
    )
    order = uuid.uuid4()
    pending, two_hours = DeliveryStatus.PENDING, timedelta(hours=2)
    first = _delivery(endpoint, status=pending, age=two_hours, subject=order)
    _delivery(endpoint, status=pending, age=two_hours, subject=order, sequence=2)
    _delivery(later, status=pending, age=timedelta(minutes=5))
    # The order's first event failed and waits for its retry in an hour; its second is overdue
    # but may not go before it.
    Delivery.objects.filter(pk=first.pk).update(next_attempt_at=timezone.now() + timedelta(hours=1))
    assert claim_next(endpoint.pk) is None
    for _ in range(3):
        assert sweep() == 1
    assert rung == [later.pk] * 3

    # The first event's retry falls due: the endpoint with the longest overdue delivery first.
    Delivery.objects.filter(pk=first.pk).update(next_attempt_at=timezone.now() - timedelta(hours=1))
    rung.clear()
    assert sweep() == 1
    assert rung == [endpoint.pk]

    # An attempt in flight to the endpoint: nothing else may go to it now, not even another
    # order's event, overdue the longest.
    _delivery(endpoint, status=DeliveryStatus.PENDING, age=timedelta(hours=3))
    Delivery.objects.filter(pk=first.pk).update(lease_until=timezone.now() + timedelta(minutes=1))
    rung.clear()
    assert sweep() == 1
    assert rung == [later.pk]


def test_the_redeliver_service_refuses_staff_without_the_permission(endpoint):
    from django.core.exceptions import PermissionDenied

    from webhooks.services import deliveries_redeliver

    dead = _delivery(endpoint, status=DeliveryStatus.DEAD)
    with pytest.raises(PermissionDenied):
        deliveries_redeliver(deliveries=[dead], user=_staff("vic", VIEW))
    dead.refresh_from_db()
    assert dead.status == DeliveryStatus.DEAD
    assert not AuditEntry.objects.filter(action="webhook_redeliver").exists()


def test_redelivering_more_dead_deliveries_than_one_statement_takes(endpoint, monkeypatch):
    """The ids go a chunk at a time (a statement bound on the server carries at most 65,535
    parameters): here three a statement, for seven dead deliveries and one delivered."""
    from webhooks import services
    from webhooks.services import deliveries_redeliver

    monkeypatch.setattr(services, "_IDS_PER_STATEMENT", 3)
    dead = [_delivery(endpoint, status=DeliveryStatus.DEAD) for _ in range(7)]
    done = _delivery(endpoint, status=DeliveryStatus.DELIVERED)
    with CaptureQueriesContext(connection) as captured:
        changed = deliveries_redeliver(
            deliveries=[*dead, done], user=_staff("ria", [*VIEW, "redeliver_delivery"])
        )
    assert changed == 7
    statuses = dict(Delivery.objects.values_list("pk", "status"))
    assert {statuses[d.pk] for d in dead} == {DeliveryStatus.PENDING}
    assert statuses[done.pk] == DeliveryStatus.DELIVERED
    (entry,) = AuditEntry.objects.filter(action="webhook_redeliver")
    assert sorted(entry.detail["deliveries"]) == sorted(d.pk for d in dead)
    updates = [q["sql"] for q in captured if q["sql"].startswith('UPDATE "webhooks_delivery"')]
    assert len(updates) == 3  # 3 + 3 + 1
