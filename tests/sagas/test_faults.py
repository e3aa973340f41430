"""``SAGA_FAULTS``: parsing refuses bad values by name, and the seam fails, loses and delays
the participants' real operations exactly as docs/design.md says (``crash`` is left to the
worker tests: in-process it would kill the test runner)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import pytest

from inventory.models import Product, Reservation
from inventory.services import reservation_commit, reservation_release, reservation_reserve
from payments.models import ProviderAuthorization
from payments.services import payment_authorize, payment_capture, payment_refund, payment_void
from sagas.faults import (
    OPERATIONS,
    FaultConfigError,
    FaultSpec,
    InjectedError,
    InjectedTimeout,
    fault_point,
    parse_faults,
)
from shipping.models import Shipment
from shipping.services import shipment_arrange, shipment_cancel
from tests.conftest import WorkerHandle, _worker_env, worker_refusing_to_start

REPO_ROOT = Path(__file__).resolve().parents[2]


# -- parsing ---------------------------------------------------------------------------------
@pytest.mark.parametrize("raw", [None, "", "   ", "{}"])
def test_unset_or_empty_means_no_faults(raw):
    """Nothing configured, nothing injected."""
    assert parse_faults(raw) == {}


def test_the_documented_example_parses():
    """docs/design.md's example is valid and read as written."""
    specs = parse_faults(
        '{"payments.authorize": {"error": 0.2, "lost_response": 0.05, "latency_ms": [5, 50]},'
        ' "shipping.arrange": {"crash": 0.01}}'
    )
    assert specs == {
        "payments.authorize": FaultSpec(error=0.2, lost_response=0.05, latency_ms=(5.0, 50.0)),
        "shipping.arrange": FaultSpec(crash=0.01),
    }


@pytest.mark.parametrize(
    ("raw", "named"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"payments.teleport": {"error": 0.1}}', "'payments.teleport'"),
        ('{"payments.authorize": 0.5}', "SAGA_FAULTS['payments.authorize']"),
        ('{"payments.authorize": {"explode": 0.1}}', "'explode'"),
        ('{"payments.authorize": {"error": 1.5}}', "SAGA_FAULTS['payments.authorize']['error']"),
        ('{"payments.authorize": {"error": -0.1}}', "SAGA_FAULTS['payments.authorize']['error']"),
        ('{"shipping.cancel": {"crash": "often"}}', "SAGA_FAULTS['shipping.cancel']['crash']"),
        (
            '{"inventory.reserve": {"lost_response": true}}',
            "SAGA_FAULTS['inventory.reserve']['lost_response']",
        ),
        (
            '{"inventory.commit": {"latency_ms": [50, 5]}}',
            "SAGA_FAULTS['inventory.commit']['latency_ms']",
        ),
        (
            '{"inventory.commit": {"latency_ms": [5]}}',
            "SAGA_FAULTS['inventory.commit']['latency_ms']",
        ),
        (
            '{"inventory.commit": {"latency_ms": [-1, 5]}}',
            "SAGA_FAULTS['inventory.commit']['latency_ms']",
        ),
    ],
)
def test_malformed_values_are_refused_naming_the_bad_key(raw, named):
    """Every malformed value raises FaultConfigError whose message points at the culprit."""
    with pytest.raises(FaultConfigError) as caught:
        parse_faults(raw)
    assert named in str(caught.value)


def test_a_worker_with_malformed_faults_refuses_to_start():
    """At worker start a malformed value ends the process with a message naming the key."""
    env = {**os.environ, "SAGA_FAULTS": '{"payments.authorize": {"error": 2}}'}
    script = (
        "import django; django.setup(); "
        "from sagas.faults import load_faults_or_exit; load_faults_or_exit()"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "SAGA_FAULTS['payments.authorize']['error']" in proc.stderr


@pytest.mark.django_db
def test_a_real_worker_with_malformed_faults_stops_before_its_pool_and_its_broker():
    """Refused at worker_init: the broker here is down, so a worker that looked for it first
    would wait for it and never refuse; nor is any pool child left to write a traceback."""
    done = worker_refusing_to_start({"SAGA_FAULTS": '{"payments.authorize": {"eror": 0.2}}'})
    assert done.returncode == 2, done.stderr[-3000:]
    assert "refusing to start: SAGA_FAULTS['payments.authorize']" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout


@pytest.mark.django_db(transaction=True)
def test_a_worker_with_faults_set_says_so_once_at_start():
    """Injected failures otherwise show only in saga timelines: a ``SAGA_FAULTS`` left over
    from a chaos run would look like a provider outage."""
    faults = '{"payments.authorize": {"error": 0.2}, "shipping.arrange": {"latency_ms": [1, 2]}}'
    env = _worker_env({"SAGA_FAULTS": faults, "CELERY_QUEUE": f"faults-{uuid.uuid4().hex[:8]}"})
    worker = WorkerHandle("faults", env, concurrency=1, pool="prefork")
    try:
        worker.wait_ready()
        log = worker.log_text()
    finally:
        worker.stop()
    lines = [line for line in log.splitlines() if "worker.faults_injected" in line]
    assert len(lines) == 1, log[-3000:]
    assert re.search(r"level\W{1,4}warning", lines[0]), lines[0]
    assert "payments.authorize" in lines[0] and "shipping.arrange" in lines[0], lines[0]


def test_fault_points_only_accept_known_operations():
    """A typo in an operation name fails at import, not silently at run time."""
    with pytest.raises(ValueError):
        fault_point("payments.authorise")


# -- the seam, on every participant operation -------------------------------------------------
@dataclass
class Case:
    """How to prepare an operation, run it, and see whether it took effect."""

    prepare: Callable[[], object]
    run: Callable[[], object]
    took_effect: Callable[[], bool]


ORDER = uuid.UUID("00000000-0000-0000-0000-0000000000aa")


def _reserve() -> object:
    return reservation_reserve(key="r", order_id=ORDER, lines=[("sku", 2)])


def _authorize() -> object:
    return payment_authorize(
        key="a",
        order_id=ORDER,
        amount=Decimal("5.00"),
        currency="EUR",
        payment_method="pm_card_visa",
    )


def _capture() -> object:
    return payment_capture(key="c", order_id=ORDER, authorize_key="a")


def _authorize_and_capture() -> object:
    _authorize()
    return _capture()


def _arrange() -> object:
    return shipment_arrange(key="s", order_id=ORDER, country="GB")


def _auth_status() -> str | None:
    auth = ProviderAuthorization.objects.first()
    return auth.status if auth else None


def _reservation_status() -> str | None:
    r = Reservation.objects.filter(key="r").first()
    return r.status if r else None


def _nothing() -> None:
    return None


CASES: dict[str, Case] = {
    "inventory.reserve": Case(_nothing, _reserve, lambda: _reservation_status() == "held"),
    "inventory.release": Case(
        _reserve,
        lambda: reservation_release(key="r:undo", forward_key="r"),
        lambda: _reservation_status() == "released",
    ),
    "inventory.commit": Case(
        _reserve,
        lambda: reservation_commit(key="r:commit", forward_key="r"),
        lambda: _reservation_status() == "committed",
    ),
    "payments.authorize": Case(_nothing, _authorize, lambda: _auth_status() == "authorized"),
    "payments.capture": Case(_authorize, _capture, lambda: _auth_status() == "captured"),
    "payments.void": Case(
        _authorize,
        lambda: payment_void(key="a:undo", order_id=ORDER, forward_key="a"),
        lambda: _auth_status() == "voided",
    ),
    "payments.refund": Case(
        _authorize_and_capture,
        lambda: payment_refund(key="c:undo", order_id=ORDER, forward_key="c"),
        lambda: _auth_status() == "refunded",
    ),
    "shipping.arrange": Case(
        _nothing, _arrange, lambda: Shipment.objects.filter(status="arranged").exists()
    ),
    "shipping.cancel": Case(
        _arrange,
        lambda: shipment_cancel(key="s:undo", forward_key="s"),
        lambda: Shipment.objects.filter(status="cancelled").exists(),
    ),
}


def test_every_documented_operation_has_a_case():
    """The seam tests below cover each operation docs/design.md names."""
    assert set(CASES) == OPERATIONS


def prepared(operation: str) -> Case:
    Product.objects.create(sku="sku", name="Sku", price=Decimal("2.50"), stock_on_hand=5)
    case = CASES[operation]
    case.prepare()
    assert not case.took_effect()
    return case


def faults(settings, operation: str, **spec: object) -> None:
    settings.SAGA_FAULTS = json.dumps({operation: spec})


@pytest.mark.django_db
@pytest.mark.parametrize("operation", sorted(CASES))
def test_error_fails_before_anything_happens(operation, settings):
    """``error``: a transient error is raised and the operation has no effect."""
    case = prepared(operation)
    faults(settings, operation, error=1.0)
    with pytest.raises(InjectedError) as caught:
        case.run()
    assert isinstance(caught.value, ConnectionError)
    assert not case.took_effect()


@pytest.mark.django_db
@pytest.mark.parametrize("operation", sorted(CASES))
def test_lost_response_takes_effect_then_times_out(operation, settings):
    """``lost_response``: the effect happens, the caller gets a timeout, and asking again with
    the same key settles it with the first answer and no second effect."""
    case = prepared(operation)
    faults(settings, operation, lost_response=1.0)
    with pytest.raises(InjectedTimeout):
        case.run()
    assert case.took_effect()
    settings.SAGA_FAULTS = ""
    first = case.run()
    assert case.run() == first
    assert case.took_effect()
    assert ProviderAuthorization.objects.count() <= 1
    assert Shipment.objects.filter(status="arranged").count() <= 1
    product = Product.objects.get(sku="sku")
    assert product.reserved in (0, 2) and product.stock_on_hand in (3, 5)


@pytest.mark.django_db
@pytest.mark.parametrize("operation", sorted(CASES))
def test_latency_is_accepted(operation, settings):
    """``latency_ms``: the operation is only delayed; it answers and takes effect normally."""
    case = prepared(operation)
    faults(settings, operation, latency_ms=[0, 2])
    assert isinstance(case.run(), dict)
    assert case.took_effect()


@pytest.mark.django_db
def test_faults_on_another_operation_change_nothing(settings):
    """Faults are per operation: configuring one leaves the others alone."""
    Product.objects.create(sku="sku", name="Sku", price=Decimal("2.50"), stock_on_hand=5)
    faults(settings, "payments.authorize", error=1.0)
    assert _reserve()["lines"] == [["sku", 2]]
