"""``python manage.py saga_bench``: the engine and order-saga benchmark.

Starts its own worker processes on a queue of its own, runs the engine's 5-step workload and a
plain Celery ``chain`` of the same five writes (and with ``--order`` the real order saga), and
prints sagas/s, p50/p99, queries per step, broker messages per saga and the ratio to the chain.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import uuid
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand

QUEUE_ENV = "SAGA_BENCH_QUEUE"


class Command(BaseCommand):
    help = "Benchmark the saga engine (and the order saga) against a plain Celery chain."

    def add_arguments(self, parser):
        parser.add_argument("--sagas", type=int, default=1000, help="sagas per workload")
        parser.add_argument("--warmup", type=int, default=100)
        parser.add_argument("--processes", type=int, default=1, help="worker processes")
        parser.add_argument("--concurrency", type=int, default=2, help="pool size per process")
        parser.add_argument("--pool", default="prefork", choices=["prefork", "threads"])
        parser.add_argument(
            "--rate", type=float, default=None, help="offered sagas/s (default: all at once)"
        )
        parser.add_argument("--order", action="store_true", help="also run the real order saga")
        parser.add_argument("--order-only", action="store_true")
        parser.add_argument(
            "--latency", action="store_true", help="order saga with 20-50 ms on every provider call"
        )
        parser.add_argument("--skip-chain", action="store_true")
        parser.add_argument("--json", type=Path, default=None, help="write results here")
        # make bench (lab.bench_suite): its own database and Redis, several load levels.
        suite = parser.add_argument_group("suite (make bench)")
        suite.add_argument(
            "--all",
            action="store_true",
            help="every workload at saturation and at several offered loads, the table, JSON "
            "and plot, then the sweeper (make bench)",
        )
        suite.add_argument("--sweep", action="store_true", help="time one sweep among 1M sagas")
        suite.add_argument("--soak", type=float, default=None, metavar="SECONDS",
                           help="worker RSS at start and end of a run this long")  # fmt: skip
        suite.add_argument("--levels", default="0.25,0.5,0.75,0.9,1.0",
                           help="offered loads, as fractions of saturation throughput")  # fmt: skip
        suite.add_argument("--level-seconds", type=float, default=15.0)
        suite.add_argument(
            "--bursts",
            type=int,
            default=3,
            help="saturation bursts per workload; the median one is reported",
        )
        suite.add_argument(
            "--workloads",
            default="",
            help="any of engine,engine_tx,chain,order_chain,order,order_threads,order_latency",
        )
        suite.add_argument("--quick", action="store_true", help="smaller counts (tooling check)")
        suite.add_argument("--out-dir", default=None, help="default: bench-results/")
        suite.add_argument("--plot", default=None, help="also copy the PNG here")
        suite.add_argument("--skip-sweep", action="store_true")
        suite.add_argument(
            "--no-vacuum",
            action="store_true",
            help="skip the VACUUM (ANALYZE) before each workload (every workload then inherits "
            "the dead rows of those before it where autovacuum is off)",
        )
        suite.add_argument("--sweep-sagas", type=int, default=1_000_000)
        suite.add_argument("--sweep-repeats", type=int, default=7)
        suite.add_argument("--keep", action="store_true", help="keep the scratch database")

    def handle(self, *args, **opts):
        # SIGTERM (a CI timeout, `kill`) stops the bench's workers and servers like Ctrl-C does,
        # instead of leaving them running with nobody to stop them.
        signal.signal(signal.SIGTERM, _interrupt)
        if opts["all"] or opts["sweep"] or opts["soak"]:
            from lab import bench_suite

            sys.exit(bench_suite.main(opts, sys.argv))
        queue = os.environ.get(QUEUE_ENV)
        if queue != settings.CELERY_TASK_DEFAULT_QUEUE:
            # Re-run in a process whose default queue is the bench's own, so doorbells sent by
            # the engine reach the bench workers and never a `make run` worker.
            queue = f"bench-{uuid.uuid4().hex[:8]}"
            env = {**os.environ, QUEUE_ENV: queue, "CELERY_QUEUE": queue}
            os.execvpe(sys.executable, [sys.executable, "manage.py", *sys.argv[1:]], env)

        from lab import engine_bench as benchmark

        worker_env = {}
        if opts["latency"]:
            ops = [
                "inventory.reserve", "inventory.release", "inventory.commit",
                "payments.authorize", "payments.void", "payments.capture", "payments.refund",
                "shipping.arrange", "shipping.cancel",
            ]  # fmt: skip
            worker_env["SAGA_FAULTS"] = json.dumps({op: {"latency_ms": [20, 50]} for op in ops})
        workers = benchmark.BenchWorkers(
            processes=opts["processes"],
            concurrency=opts["concurrency"],
            pool=opts["pool"],
            env=worker_env,
        )
        results = []
        try:
            n = opts["sagas"]
            self.stdout.write(
                f"saga_bench: {n} sagas per workload, {opts['processes']} worker process(es) x "
                f"{opts['concurrency']} ({opts['pool']}), queue {queue}"
            )
            if not opts["order_only"]:
                benchmark.run_engine(opts["warmup"])
                results.append(benchmark.run_engine(n, rate=opts["rate"]))
                if not opts["skip_chain"]:
                    benchmark.run_chain(opts["warmup"])
                    results.append(benchmark.run_chain(n, rate=opts["rate"]))
            if opts["order"] or opts["order_only"]:
                from lab.order_bench import run_orders

                run_orders(min(opts["warmup"], 50))
                results.append(run_orders(n, rate=opts["rate"], latency=opts["latency"]))
        finally:
            workers.stop()

        self.stdout.write(benchmark.HEADER)
        for r in results:
            self.stdout.write(r.row())
        by_name = {r.name: r for r in results}
        chain = by_name.get("plain celery chain")
        if chain:
            for r in results:
                if r is not chain:
                    self.stdout.write(
                        f"ratio {r.name} / plain chain: {r.sagas_per_s / chain.sagas_per_s:.2f}x"
                    )
        if opts["json"]:
            opts["json"].parent.mkdir(parents=True, exist_ok=True)
            opts["json"].write_text(json.dumps([benchmark.as_dict(r) for r in results], indent=2))


def _interrupt(signum, frame):
    raise KeyboardInterrupt
