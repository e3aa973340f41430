"""``manage.py admin_bench``: server time and query count of the ops console's pages.

Renders each page in-process with Django's test client (logged in as a superuser created for
the purpose), a few times after one warm-up, and reports the median and worst time, the
number of SQL queries and the time spent in them. Run it against a database filled by
``generate_sagas`` to see how the pages behave at scale::

    python manage.py generate_sagas --sagas 1000000 --events-per-saga 10
    python manage.py admin_bench
"""

from __future__ import annotations

import json
import statistics
import time
from urllib.parse import urlencode

from django.conf import settings
from django.contrib.admin import helpers
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext, override_settings
from django.urls import reverse

from lab import bench_saga  # noqa: F401 - registers bench5: one page filters by it
from sagas.models import Saga, SagaState
from sagas.selectors import saga_stuck_q

BENCH_ADMIN = "admin-bench"


class Command(BaseCommand):
    help = "Measure the ops console's pages (server time, queries) on the current database."

    def add_arguments(self, parser):
        parser.add_argument("--repeat", type=int, default=5, help="measured runs per page")
        parser.add_argument("--json", action="store_true", help="print JSON instead of a table")

    def handle(self, *args, **opts):
        with override_settings(ALLOWED_HOSTS=[*settings.ALLOWED_HOSTS, "testserver"]):
            results = self._run(max(opts["repeat"], 1))
        if opts["json"]:
            self.stdout.write(json.dumps(results, indent=2))
            return
        width = max(len(r["page"]) for r in results)
        self.stdout.write(f"{'page'.ljust(width)}  status  median ms  worst ms  queries  sql ms")
        for r in results:
            self.stdout.write(
                f"{r['page'].ljust(width)}  {r['status']:>6}  {r['median_ms']:>9.1f}  "
                f"{r['worst_ms']:>8.1f}  {r['queries']:>7}  {r['sql_ms']:>6.1f}"
            )

    def _run(self, repeat: int) -> list[dict]:
        if not Saga.objects.exists():
            raise CommandError("No sagas: run generate_sagas first.")
        client = Client()
        client.force_login(self._admin())
        changelist = reverse("admin:sagas_saga_changelist")
        samples = self._samples()
        # A deep page (OFFSET 4,950) where the table has one; page 2 on a small one.
        deep = 100 if Saga.objects.order_by()[:5001].count() > 5000 else 2
        pages: list[tuple[str, str, dict | None]] = [
            ("admin index", reverse("admin:index"), None),
            ("saga list", changelist, None),
            (f"saga list, page {deep}", f"{changelist}?p={deep}", None),
            ("saga list, state=needs_manual", f"{changelist}?state__exact=needs_manual", None),
            ("saga list, state=succeeded", f"{changelist}?state__exact=succeeded", None),
            ("saga list, stuck", f"{changelist}?stuck=yes", None),
            ("saga list, type=bench5", f"{changelist}?saga_type=bench5", None),
            ("saga list, failed step", f"{changelist}?failed_step=authorize_payment", None),
        ]
        if samples.get("signature"):
            pages.append(
                (
                    "saga list, failure signature",
                    f"{changelist}?{urlencode({'signature': samples['signature']})}",
                    None,
                )
            )
        if samples.get("day"):
            year, month, day = samples["day"]
            query = urlencode(
                {"created_at__year": year, "created_at__month": month, "created_at__day": day}
            )
            pages.append(("saga list, one day", f"{changelist}?{query}", None))
        pages += [
            ("saga search: saga id", f"{changelist}?q={samples['saga_id']}", None),
            ("saga search: order id", f"{changelist}?q={samples.get('order_id', 'none')}", None),
            (
                "saga search: correlation id",
                f"{changelist}?{urlencode({'q': samples.get('correlation_id', 'none')})}",
                None,
            ),
        ]
        for label, key in (("failed", "failed_id"), ("needs_manual", "manual_id")):
            if samples.get(key):
                url = reverse("admin:sagas_saga_change", args=[samples[key]])
                pages.append((f"saga page ({label})", url, None))
        pages.append(("saga dashboard", reverse("admin:sagas_saga_dashboard"), None))
        if samples.get("stuck_id"):
            pages.append(
                (
                    "compensate: plan page",
                    changelist,
                    {
                        "action": "compensate",
                        "index": "0",
                        helpers.ACTION_CHECKBOX_NAME: [samples["stuck_id"]],
                    },
                )
            )
        pages.append(("order list", reverse("admin:orders_order_changelist"), None))
        if samples.get("order_id"):
            url = reverse("admin:orders_order_change", args=[samples["order_id"]])
            pages.append(("order page", url, None))

        results = []
        for label, url, post in pages:
            results.append(self._measure(client, label, url, post, repeat))
        return results

    def _measure(self, client: Client, label: str, url: str, post: dict | None, repeat: int):
        def request():
            # As over HTTPS: production settings redirect plain http (HTTPS_ONLY).
            if post is not None:
                return client.post(url, post, secure=True)
            return client.get(url, secure=True)

        request()  # warm-up: caches, connection, template loading
        times, queries, sql_ms, status = [], 0, [], 0
        for _ in range(repeat):
            with CaptureQueriesContext(connection) as ctx:
                started = time.perf_counter()
                response = request()
                times.append((time.perf_counter() - started) * 1000)
            status = response.status_code
            queries = len(ctx.captured_queries)
            sql_ms.append(sum(float(q["time"]) for q in ctx.captured_queries) * 1000)
        return {
            "page": label,
            "url": url,
            "status": status,
            "median_ms": round(statistics.median(times), 1),
            "worst_ms": round(max(times), 1),
            "queries": queries,
            "sql_ms": round(statistics.median(sql_ms), 1),
        }

    def _admin(self):
        user, created = get_user_model().objects.get_or_create(
            username=BENCH_ADMIN, defaults={"is_staff": True, "is_superuser": True}
        )
        if created:
            user.set_unusable_password()
            user.save(update_fields=["password"])
        return user

    def _samples(self) -> dict:
        """Representative rows to open: found through indexed reads only."""
        samples: dict = {}
        newest = Saga.objects.order_by("-created_at").values("pk", "created_at").first()
        samples["saga_id"] = newest["pk"]
        day = newest["created_at"]
        samples["day"] = (day.year, day.month, day.day)
        failed = (
            Saga.objects.filter(state=SagaState.COMPENSATED)
            .exclude(failed_step="")
            .order_by("-created_at")
            .values("pk", "failed_step", "failure_code")
            .first()
        )
        if failed:
            samples["failed_id"] = failed["pk"]
            samples["signature"] = f"{failed['failed_step']}:{failed['failure_code']}"
        manual = Saga.objects.filter(state=SagaState.NEEDS_MANUAL).order_by("-created_at").first()
        if manual:
            samples["manual_id"] = manual.pk
        stuck = (
            Saga.objects.filter(saga_stuck_q(), state=SagaState.RUNNING)
            .order_by("next_attempt_at")
            .first()
        )
        if stuck:
            samples["stuck_id"] = str(stuck.pk)
        with_order = (
            Saga.objects.filter(state=SagaState.SUCCEEDED, order__isnull=False)
            .order_by("-created_at")
            .values("pk", "order__id", "correlation_id")[:1]
        )
        for row in with_order:
            samples["order_id"] = row["order__id"]
            samples["correlation_id"] = row["correlation_id"]
        return samples
