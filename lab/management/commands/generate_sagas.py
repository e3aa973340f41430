"""``manage.py generate_sagas``: a big, realistic data set for the ops console benchmark.

    python manage.py generate_sagas --sagas 1000000 --events-per-saga 10

Writes order sagas (with their step rows, timeline events, orders and order items) in every
state the engine produces, with the failure signatures, stuck sagas and sagas waiting for a
person that support staff look for, spread over ``--days``. Rows go in with PostgreSQL ``COPY``
(psycopg's ``cursor.copy``) in batches, then the tables are vacuumed and analysed so the
planner's statistics (and the console's estimated counts) match.

For benchmark databases only: it appends to whatever is there and never runs a participant.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from django.db import connection

from lab import bench_saga  # noqa: F401 - registers bench5, whose sagas the data set mixes in
from orders.models import Order, OrderItem
from sagas.definition import forward_key, registered_types
from sagas.models import Saga, SagaEvent, SagaStep

ORDER_STEPS = [
    ("reserve_inventory", "release_inventory"),
    ("authorize_payment", "void_authorization"),
    ("arrange_shipment", "cancel_shipment"),
    ("capture_payment", "refund_payment"),
    ("confirm_order", None),
]
BENCH_STEPS = [(f"write_{i}", "_undo") for i in range(1, 6)]
BENCH_USER = "bench-customer"
#: The columns each row is written with, in order; other columns get the field's default.
COLUMNS = {
    Saga: [
        "id",
        "saga_type",
        "state",
        "current_step",
        "step_index",
        "version",
        "attempt",
        "next_attempt_at",
        "lease_until",
        "deadline_at",
        "cancel_reason",
        "failure_code",
        "failed_step",
        "last_error",
        "escalated_from",
        "data",
        "results",
        "correlation_id",
        "created_at",
        "updated_at",
        "finished_at",
    ],
    SagaStep: [
        "id",
        "saga_id",
        "index",
        "name",
        "status",
        "attempts",
        "idempotency_key",
        "result",
        "took_effect",
        "maybe_effect",
        "compensation_attempts",
        "last_error",
        "updated_at",
    ],
    SagaEvent: ["id", "saga_id", "at", "kind", "step", "attempt", "detail", "actor", "duration_ms"],
    Order: [
        "id",
        "owner_id",
        "currency",
        "total",
        "payment_method",
        "shipping_name",
        "shipping_line1",
        "shipping_city",
        "shipping_postal_code",
        "shipping_country",
        "saga_id",
        "created_at",
        "updated_at",
    ],
    OrderItem: ["id", "order_id", "sku", "quantity", "unit_price"],
}


@dataclass
class Story:
    """One kind of saga: its final row fields, its steps' statuses and its timeline."""

    name: str
    weight: float
    state: str
    #: Index of the step the saga stopped at (or is at).
    at: int
    failed_step: str = ""
    failure_code: str = ""
    last_error: str = ""
    cancel_reason: str = ""
    escalated_from: str = ""
    #: Active sagas only: how next_attempt_at relates to now.
    stuck: bool = False
    #: Sagas in active states are recent (created in the last 2 hours) unless stuck.
    recent: bool = False
    events: list[tuple[str, str, int, str, str, str]] = field(default_factory=list)
    step_status: list[str] = field(default_factory=list)


def _stories(
    saga_type: str, steps: list[tuple[str, str | None]], events_per_saga: int
) -> list[Story]:
    names = [s for s, _ in steps]
    n = len(steps)

    def forward(upto: int) -> list[tuple]:
        return [("step_succeeded", names[i], 1, "", "engine", "4.2") for i in range(upto)]

    def undo(frm: int) -> list[tuple]:
        return [
            ("compensation_succeeded", names[j], 1, "", "engine", "3.1")
            for j in range(frm, -1, -1)
            if steps[j][1]
        ]

    started = [("started", "", 0, f"type {saga_type}", "engine", "\\N")]
    stories: list[Story] = []

    ok = Story("succeeded", 0.84, "succeeded", n - 1)
    ok.events = [*started, *forward(n), ("succeeded", "", 0, "", "engine", "\\N")]
    ok.step_status = ["succeeded"] * n
    stories.append(ok)

    business = [
        (0, "out_of_stock", 0.03, "OutOfStock: SR-LAMP: 2 requested, 1 available"),
        (1, "payment_declined", 0.025, "PaymentDeclined: card declined (pm_card_declined)"),
        (2, "shipping_unavailable", 0.01, "ShippingUnavailable: no carrier serves AQ"),
        (3, "payment_declined", 0.005, "PaymentDeclined: capture declined"),
    ]
    for at, code, weight, error in business:
        if at >= n - 1:
            continue
        s = Story(
            f"failed:{names[at]}:{code}",
            weight,
            "compensated",
            at,
            failed_step=names[at],
            failure_code=code,
            last_error=f"{code}: {error}",
        )
        s.events = [
            *started,
            *forward(at),
            ("step_failed", names[at], 1, error, "engine", "6.0"),
            ("compensation_started", "", 1, f"reason: {code}", "engine", "\\N"),
            *undo(at - 1),
            ("compensated", "", 0, f"reason: {code}", "engine", "\\N"),
        ]
        s.step_status = ["compensated"] * at + ["failed"] + ["pending"] * (n - at - 1)
        stories.append(s)

    exhausted = Story(
        f"failed:{names[1]}:step_failed",
        0.005,
        "compensated",
        1,
        failed_step=names[1],
        failure_code="step_failed",
        last_error="ProviderUnavailable: provider answered 503",
    )
    exhausted.events = [
        *started,
        *forward(1),
        *[
            (
                "step_retry",
                names[1],
                a,
                "ProviderUnavailable: provider answered 503",
                "engine",
                "30.0",
            )
            for a in range(1, 5)
        ],
        ("step_failed", names[1], 5, "ProviderUnavailable: provider answered 503", "engine", "30"),
        ("compensation_started", "", 1, "reason: step_failed", "engine", "\\N"),
        *undo(1),
        ("compensated", "", 0, "reason: step_failed", "engine", "\\N"),
    ]
    exhausted.step_status = ["compensated", "compensated"] + ["pending"] * (n - 2)
    stories.append(exhausted)

    for code, weight in (("customer_cancelled", 0.005), ("timed_out", 0.003)):
        s = Story(
            f"cancelled:{code}", weight, "compensated", 2, failure_code=code, cancel_reason=code
        )
        s.events = [
            *started,
            *forward(2),
            (
                "cancel_requested",
                "",
                0,
                f"reason: {code}",
                "user:customer" if code == "customer_cancelled" else "sweeper",
                "\\N",
            ),
            ("cancel_honoured", names[2], 1, f"reason: {code}", "engine", "\\N"),
            ("compensation_started", "", 1, f"reason: {code}", "engine", "\\N"),
            *undo(1),
            ("compensated", "", 0, f"reason: {code}", "engine", "\\N"),
        ]
        s.step_status = ["compensated", "compensated"] + ["pending"] * (n - 2)
        stories.append(s)

    retry_error = "InjectedError: shipping.arrange: injected transient error"
    for stuck, weight in ((False, 0.02), (True, 0.005)):
        s = Story(
            "running-stuck" if stuck else "running",
            weight,
            "running",
            2,
            last_error=retry_error if stuck else "",
            stuck=stuck,
            recent=not stuck,
        )
        s.events = [*started, *forward(2)]
        if stuck:
            s.events.append(("step_retry", names[2], 1, retry_error, "engine", "12.0"))
        s.step_status = ["succeeded", "succeeded", "retrying" if stuck else "pending"] + [
            "pending"
        ] * (n - 3)
        stories.append(s)

    comp = Story(
        "compensating-stuck",
        0.002,
        "compensating",
        1,
        failed_step=names[2],
        failure_code="shipping_unavailable",
        last_error="ProviderUnavailable: void timed out",
        stuck=True,
    )
    comp.events = [
        *started,
        *forward(2),
        ("step_failed", names[2], 1, "ShippingUnavailable: no carrier serves AQ", "engine", "5"),
        ("compensation_started", "", 1, "reason: shipping_unavailable", "engine", "\\N"),
        ("compensation_retry", names[1], 1, "ProviderUnavailable: void timed out", "engine", "30"),
    ]
    comp.step_status = ["succeeded", "compensating", "failed"] + ["pending"] * (n - 3)
    stories.append(comp)

    manual_error = "compensation failed: ProviderUnavailable: refund refused by the provider"
    manual = Story(
        f"needs_manual:{names[1]}",
        0.012,
        "needs_manual",
        1,
        failed_step=names[1],
        failure_code="shipping_unavailable",
        last_error=manual_error,
        escalated_from="compensating",
    )
    manual.events = [
        *started,
        *forward(2),
        ("step_failed", names[2], 1, "ShippingUnavailable: no carrier serves AQ", "engine", "5"),
        ("compensation_started", "", 1, "reason: shipping_unavailable", "engine", "\\N"),
        *[
            ("compensation_retry", names[1], a, "ProviderUnavailable: void refused", "engine", "9")
            for a in range(1, 8)
        ],
        ("compensation_failed", names[1], 8, "ProviderUnavailable: void refused", "engine", "9"),
        ("needs_manual", names[1], 8, manual_error, "engine", "\\N"),
    ]
    manual.step_status = ["succeeded", "compensation_failed", "failed"] + ["pending"] * (n - 3)
    stories.append(manual)

    resolved = Story(
        f"resolved:{names[1]}",
        0.005,
        "resolved",
        1,
        failed_step=names[1],
        failure_code="shipping_unavailable",
        last_error=manual_error,
        escalated_from="compensating",
    )
    resolved.events = [
        *manual.events,
        ("ops_resolve", names[1], 8, "voided by hand in the provider dashboard", "user:ops", "\\N"),
    ]
    resolved.step_status = manual.step_status
    stories.append(resolved)

    # Every saga gets exactly ``events_per_saga`` events: a short story is padded with retries
    # of its last step (a flaky provider), a long one is cut.
    for s in stories:
        pad_step = names[min(s.at, n - 1)]
        while len(s.events) < events_per_saga:
            s.events.insert(
                max(len(s.events) - 1, 1),
                (
                    "step_retry",
                    pad_step,
                    1,
                    "TimeoutError: provider did not answer",
                    "engine",
                    "50",
                ),
            )
        del s.events[events_per_saga:]
    return stories


class Command(BaseCommand):
    help = "Bulk-generate sagas, steps, timeline events and orders with COPY (benchmarks only)."

    def add_arguments(self, parser):
        parser.add_argument("--sagas", type=int, default=10_000)
        parser.add_argument("--events-per-saga", type=int, default=10)
        parser.add_argument("--days", type=float, default=30.0, help="spread of created_at")
        parser.add_argument("--batch", type=int, default=50_000, help="sagas per COPY batch")
        parser.add_argument("--seed", type=int, default=None)
        parser.add_argument(
            "--no-vacuum", action="store_true", help="skip VACUUM ANALYZE at the end"
        )
        parser.add_argument(
            "--keep-indexes",
            action="store_true",
            help="on an empty database, keep indexes and foreign keys during the load "
            "(slower; by default they are dropped and rebuilt once at the end)",
        )

    def handle(self, *args, **opts):
        if connection.vendor != "postgresql":
            raise CommandError("generate_sagas needs PostgreSQL (it writes with COPY).")
        total, per_saga = opts["sagas"], opts["events_per_saga"]
        if total < 1 or per_saga < 1:
            raise CommandError("--sagas and --events-per-saga must be at least 1.")
        rng = random.Random(opts["seed"])
        self._uuids = _uuid7_sequence(rng)
        self._extra = {model: _default_columns(model) for model in COLUMNS}
        started = time.monotonic()
        owner = self._bench_user()
        order_stories = _stories("order", ORDER_STEPS, per_saga)
        bench_stories = (
            _stories("bench5", BENCH_STEPS, per_saga) if "bench5" in registered_types() else []
        )
        next_ids = {model: self._next_id(model) for model in (SagaEvent, SagaStep, OrderItem)}
        self.stdout.write(
            f"Generating {total:,} sagas with {per_saga} events each "
            f"({total * per_saga:,} events) over {opts['days']:g} days ..."
        )
        now = datetime.now(UTC).replace(microsecond=0)
        span = int(opts["days"] * 86400)
        # A fresh database loads much faster without its secondary indexes and foreign keys,
        # rebuilt once at the end (PostgreSQL's "populating a database" advice).
        rebuild: list[str] = []
        if not opts["keep_indexes"] and not Saga.objects.exists():
            rebuild = self._drop_secondary_indexes()
        done = 0
        try:
            while done < total:
                size = min(opts["batch"], total - done)
                self._batch(rng, size, now, span, owner, order_stories, bench_stories, next_ids)
                done += size
                rate = done / (time.monotonic() - started)
                self.stdout.write(f"  {done:,} sagas ({rate:,.0f} sagas/s)")
        finally:
            if rebuild:
                self._rebuild(rebuild)
        for model, next_id in next_ids.items():
            self._set_sequence(model, next_id)
        copied = time.monotonic() - started
        if not opts["no_vacuum"]:
            self._vacuum()
        self.stdout.write(
            self.style.SUCCESS(
                f"Done: {total:,} sagas, {total * per_saga:,} events in "
                f"{copied:.1f}s of COPY and index builds, {time.monotonic() - started:.1f}s in all."
            )
        )

    # -- helpers -------------------------------------------------------------------------------
    def _bench_user(self) -> int:
        user, _ = get_user_model().objects.get_or_create(username=BENCH_USER)
        return user.pk

    def _next_id(self, model) -> int:
        with connection.cursor() as cursor:
            cursor.execute(f"SELECT COALESCE(MAX(id), 0) + 1 FROM {model._meta.db_table}")
            return int(cursor.fetchone()[0])

    def _set_sequence(self, model, next_id: int) -> None:
        table = model._meta.db_table
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT setval(pg_get_serial_sequence(%s, 'id'), %s, false)", [table, next_id]
            )

    def _drop_secondary_indexes(self) -> list[str]:
        """Drop the loaded tables' foreign keys, unique constraints and plain indexes (not the
        primary keys); return the statements that recreate them, in a safe order."""
        tables = [m._meta.db_table for m in COLUMNS]
        foreign, unique, indexes, drop_fk, drops = [], [], [], [], []
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT conrelid::regclass::text, conname, contype, pg_get_constraintdef(oid)"
                " FROM pg_constraint WHERE conrelid = ANY(%s::regclass[])"
                " AND contype IN ('f', 'u')",
                [tables],
            )
            for table, name, kind, definition in cursor.fetchall():
                (drop_fk if kind == "f" else drops).append(
                    f'ALTER TABLE {table} DROP CONSTRAINT "{name}"'
                )
                add = f'ALTER TABLE {table} ADD CONSTRAINT "{name}" {definition}'
                (foreign if kind == "f" else unique).append(add)
            cursor.execute(
                "SELECT i.indexrelid::regclass::text, pg_get_indexdef(i.indexrelid)"
                " FROM pg_index i WHERE i.indrelid = ANY(%s::regclass[])"
                " AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid)",
                [tables],
            )
            for name, definition in cursor.fetchall():
                drops.append(f"DROP INDEX {name}")
                indexes.append(definition)
            # Foreign keys first: they may depend on the unique constraints they reference.
            for statement in [*drop_fk, *drops]:
                cursor.execute(statement)
        self.stdout.write(
            f"Fresh database: dropped {len(indexes)} indexes, {len(unique)} unique constraints "
            f"and {len(foreign)} foreign keys for the load; they are rebuilt at the end."
        )
        return [*unique, *indexes, *foreign]

    def _rebuild(self, statements: list[str]) -> None:
        self.stdout.write(f"Rebuilding {len(statements)} indexes and constraints ...")
        with connection.cursor() as cursor:
            cursor.execute("SET maintenance_work_mem = '512MB'")
            for statement in statements:
                cursor.execute(statement)
            cursor.execute("RESET maintenance_work_mem")

    def _vacuum(self) -> None:
        self.stdout.write("VACUUM ANALYZE (visibility map for index-only scans, statistics) ...")
        tables = [m._meta.db_table for m in (Saga, SagaStep, SagaEvent, Order, OrderItem)]
        if connection.in_atomic_block:
            with connection.cursor() as cursor:
                for table in tables:
                    cursor.execute(f"ANALYZE {table}")
            return
        with connection.cursor() as cursor:
            for table in tables:
                cursor.execute(f"VACUUM ANALYZE {table}")

    def _copy(self, model, rows: list[str]) -> None:
        columns = COLUMNS[model] + self._extra[model][0]
        sql = f"COPY {model._meta.db_table} ({', '.join(columns)}) FROM STDIN"
        with connection.cursor() as cursor, cursor.cursor.copy(sql) as copy:
            buffer: list[str] = []
            size = 0
            for line in rows:
                buffer.append(line)
                size += len(line)
                if size > 4_000_000:
                    copy.write("".join(buffer))
                    buffer, size = [], 0
            if buffer:
                copy.write("".join(buffer))

    def _batch(self, rng, size, now, span, owner, order_stories, bench_stories, next_ids):
        next_uuid = self._uuids
        # Each line ends with the defaults of the columns this command does not know about.
        sfx = {model: suffix + "\n" for model, (_, suffix) in self._extra.items()}
        sagas: list[str] = []
        steps: list[str] = []
        events: list[str] = []
        orders: list[str] = []
        items: list[str] = []
        order_weights = [s.weight for s in order_stories]
        event_id, step_id, item_id = (next_ids[m] for m in (SagaEvent, SagaStep, OrderItem))
        n_events = len(order_stories[0].events)
        # Events of one saga fall within the second it was created in.
        offsets = [int(k * 900_000 / n_events) for k in range(n_events)]
        for _ in range(size):
            is_bench = bench_stories and rng.random() < 0.1
            stories = bench_stories if is_bench else order_stories
            story = rng.choices(stories, weights=order_weights)[0]
            step_names = [s for s, _ in (BENCH_STEPS if is_bench else ORDER_STEPS)]
            saga_id = next_uuid()
            if story.recent:
                created = now - timedelta(seconds=rng.randrange(1, 7200))
            else:
                created = now - timedelta(seconds=rng.randrange(60, max(span, 61)))
            base = created.strftime("%Y-%m-%d %H:%M:%S")
            created_s = f"{base}+00"
            updated_s = f"{base}.950000+00"
            active = story.state in ("running", "compensating")
            finished = "\\N" if active or story.state == "needs_manual" else updated_s
            if active and story.stuck:
                next_attempt = (created + timedelta(seconds=2)).strftime("%Y-%m-%d %H:%M:%S+00")
            elif active:
                next_attempt = (now + timedelta(hours=1)).strftime("%Y-%m-%d %H:%M:%S+00")
            else:
                next_attempt = "\\N"
            order_id = next_uuid()
            amount = Decimal(rng.choice(("12.00", "24.00", "36.00", "49.00", "99.90")))
            data = (
                {"run": "generated", "n": 0}
                if is_bench
                else {
                    "order_id": str(order_id),
                    "amount": str(amount),
                    "currency": "EUR",
                    "lines": [["SR-MUG", 1]],
                }
            )
            ok_steps = [i for i, status in enumerate(story.step_status) if status in ("succeeded",)]
            results = {step_names[i]: {"ok": True} for i in ok_steps}
            deadline = (created + timedelta(seconds=600)).strftime("%Y-%m-%d %H:%M:%S+00")
            sagas.append(
                "\t".join(
                    (
                        str(saga_id),
                        "bench5" if is_bench else "order",
                        story.state,
                        step_names[story.at],
                        str(story.at),
                        str(len(story.events)),
                        "1" if active or story.state == "needs_manual" else "0",
                        next_attempt,
                        "\\N",
                        deadline,
                        story.cancel_reason,
                        story.failure_code,
                        story.failed_step,
                        story.last_error,
                        story.escalated_from,
                        json.dumps(data),
                        json.dumps(results),
                        "" if is_bench else str(order_id),
                        created_s,
                        updated_s,
                        finished,
                    )
                )
                + sfx[Saga]
            )
            sid = str(saga_id)
            for i, status in enumerate(story.step_status):
                name = step_names[i]
                took = status in ("succeeded", "compensated", "compensating", "compensation_failed")
                steps.append(
                    f"{step_id}\t{sid}\t{i}\t{name}\t{status}\t{1 if status != 'pending' else 0}\t"
                    f"{forward_key(saga_id, name)}\t"
                    f"{json.dumps({'ok': True}) if took else chr(92) + 'N'}\t"
                    f"{'t' if took else 'f'}\tf\t{1 if status.startswith('compensat') else 0}\t"
                    f"\t{updated_s}{sfx[SagaStep]}"
                )
                step_id += 1
            for k, (kind, step, attempt, detail, actor, duration) in enumerate(story.events):
                events.append(
                    f"{event_id}\t{sid}\t{base}.{offsets[k]:06d}+00\t{kind}\t{step}\t{attempt}\t"
                    f"{detail}\t{actor}\t{duration}{sfx[SagaEvent]}"
                )
                event_id += 1
            if not is_bench:
                orders.append(
                    f"{order_id}\t{owner}\tEUR\t{amount}\tpm_card_visa\tBench Customer\t"
                    f"1 Test Street\tBerlin\t10115\tDE\t{sid}\t{created_s}\t{updated_s}"
                    f"{sfx[Order]}"
                )
                items.append(f"{item_id}\t{order_id}\tSR-MUG\t1\t{amount}{sfx[OrderItem]}")
                item_id += 1
        next_ids[SagaEvent], next_ids[SagaStep], next_ids[OrderItem] = event_id, step_id, item_id

        self._copy(Saga, sagas)
        self._copy(SagaStep, steps)
        self._copy(SagaEvent, events)
        if orders:
            self._copy(Order, orders)
            self._copy(OrderItem, items)


def _uuid7_sequence(rng: random.Random):
    """UUIDv7-shaped ids, ascending in generation order.

    Index inserts then land at the right edge of each B-tree keyed by a saga or order id
    instead of all over it, which keeps a 10-million-row load fast once the indexes outgrow
    the cache. Reads do not care: an id lookup costs the same either way.
    """
    ms = int(time.time() * 1000)

    def next_uuid() -> uuid.UUID:
        nonlocal ms
        ms += 1
        value = (ms & ((1 << 48) - 1)) << 80
        value |= 0x7 << 76
        value |= rng.getrandbits(12) << 64
        value |= 0b10 << 62
        value |= rng.getrandbits(62)
        return uuid.UUID(int=value)

    return next_uuid


def _default_columns(model) -> tuple[list[str], str]:
    """Columns of ``model`` that COLUMNS does not list, and their defaults as COPY text."""
    columns, values = [], []
    for f in model._meta.concrete_fields:
        if f.column in COLUMNS[model]:
            continue
        if f.has_default():
            value = f.get_default()
        elif f.null:
            value = None
        else:
            raise CommandError(
                f"{model.__name__}.{f.name} has no default: generate_sagas must set it."
            )
        columns.append(f.column)
        if value is None:
            values.append("\\N")
        elif isinstance(value, bool):
            values.append("t" if value else "f")
        elif isinstance(value, dict | list):
            values.append(json.dumps(value))
        else:
            values.append(str(value))
    return columns, "".join(f"\t{v}" for v in values)
