"""The periodic task form refuses JSON of the wrong shape: beat reads ``headers`` and
``kwargs`` as objects and ``args`` as a list, and a ``[]`` saved as headers made it fail on
every start (and ``make run`` with it)."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import Permission, User
from django_celery_beat.models import IntervalSchedule, PeriodicTask

pytestmark = pytest.mark.django_db

GOOD = {"args": "[]", "kwargs": "{}", "headers": "{}"}


def _post(client, task: PeriodicTask, every: IntervalSchedule, **fields: str):
    return client.post(
        f"/admin/django_celery_beat/periodictask/{task.pk}/change/",
        {
            "name": task.name,
            "regtask": "",
            "task": task.task,
            "enabled": "on",
            "description": "",
            "interval": str(every.pk),
            "expire_seconds": "",
            "queue": "",
            "exchange": "",
            "routing_key": "",
            "priority": "",
            **GOOD,
            **fields,
        },
    )


@pytest.fixture
def setup(client):
    staff = User.objects.create_user("pat", is_staff=True)
    staff.user_permissions.set(
        Permission.objects.filter(
            codename__in=["view_periodictask", "change_periodictask"],
            content_type__app_label="django_celery_beat",
        )
    )
    client.force_login(staff)
    every = IntervalSchedule.objects.create(every=5, period=IntervalSchedule.MINUTES)
    task = PeriodicTask.objects.create(name="report", task="sagas.tasks.sweep", interval=every)
    return task, every


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("headers", "[]", "Must be a JSON object"),
        ("headers", '"x"', "Must be a JSON object"),
        ("kwargs", "[1]", "Must be a JSON object"),
        ("args", "{}", "Must be a JSON list"),
        ("args", "not json", "Not JSON"),
    ],
)
def test_json_of_the_wrong_shape_is_refused(client, setup, field, value, words):
    task, every = setup
    response = _post(client, task, every, **{field: value})
    assert response.status_code == 200, response.status_code  # the form again, with the error
    assert words in response.content.decode()
    task.refresh_from_db()
    assert getattr(task, field) == GOOD[field]


def test_the_right_shapes_are_saved(client, setup):
    task, every = setup
    response = _post(client, task, every, args="[1]", kwargs='{"a": 1}', headers='{"h": "v"}')
    assert response.status_code == 302, response.content.decode()[:2000]
    task.refresh_from_db()
    assert (task.args, task.kwargs, task.headers) == ("[1]", '{"a": 1}', '{"h": "v"}')
