"""The Celery application.

``celery -A config worker`` and ``celery -A config beat`` find it here. Every setting lives in
Django settings under the ``CELERY_`` namespace, so there is one place to read configuration.
"""

import logging
import os
import sys
import warnings
from collections.abc import Iterator, Mapping
from functools import cached_property
from typing import Any

from celery import Celery
from celery.apps import beat as celery_beat
from celery.apps import worker as celery_worker
from celery.exceptions import CPendingDeprecationWarning
from celery.signals import (
    after_setup_logger,
    beat_init,
    celeryd_after_setup,
    celeryd_init,
    worker_init,
    worker_process_init,
    worker_ready,
    worker_shutdown,
    worker_shutting_down,
)

from config import celery_patches

celery_patches.apply()


def _quiet_cancel_warning() -> None:
    """Celery warns on every reconnect while worker_cancel_long_running_tasks_on_connection_loss
    is False, even when set on purpose (see config/settings.py for why it is). Its logging setup
    puts an "always" filter for its warnings first, so this runs again once the worker is up."""
    warnings.filterwarnings(
        "ignore",
        message=r"(?s).*cancels all currently executed tasks with late acknowledgement",
        category=CPendingDeprecationWarning,
    )


_quiet_cancel_warning()

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")


class _CeleryNamespace(Mapping):
    """Django settings' ``CELERY_*`` names as Celery's own lower-case names, in a plain dict
    read on first use (``CELERY_TASK_ACKS_LATE`` is ``task_acks_late``).

    Celery looks its configuration up on every message it sends (about seven lookups, each
    trying two key spellings). Over Django's ``LazySettings`` every miss raises and catches an
    ``AttributeError``; over a dict it is a hash lookup. That was a third of the cost of
    publishing a doorbell (the sweeper publishes a hundred in one go). Read once, like Celery
    reads its configuration once: change ``CELERY_*`` settings before the app is first used.
    The names are converted here, as ``namespace="CELERY"`` would: handed over with their
    prefix, ``CELERY_TIMEZONE`` and five others look like Celery 3 names to its start-up check
    and every worker printed deprecation warnings.
    """

    def __init__(self) -> None:
        self._values: dict[str, Any] | None = None

    def _load(self) -> dict[str, Any]:
        if self._values is None:
            from django.conf import settings
            from django.core.exceptions import ImproperlyConfigured

            prefix = "CELERY_"
            try:
                names = dir(settings)
            except ImproperlyConfigured as exc:
                # A setting the environment got wrong (SAGA_DEADLINE=10m, say): a worker or
                # beat reads its configuration here first, and Celery's command line showed
                # the refusal at the end of a traceback of some ninety lines. One line, as
                # manage.py says it. (Web and manage.py processes load the settings before
                # anything asks Celery's configuration, so they never get here with one.)
                _refuse_to_start(str(exc))
            self._values = {
                name[len(prefix) :].lower(): getattr(settings, name)
                for name in names
                if name.startswith(prefix)
            }
        return self._values

    def __getitem__(self, key: str) -> Any:
        return self._load()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._load())

    def __len__(self) -> int:
        return len(self._load())


class _Worker(celery_worker.Worker):
    """``celery worker``, its stop said in the log (``worker.stopping``) and not on stdout.

    Celery's shutdown handlers write "worker: Warm shutdown (MainProcess)" (Cold, on SIGQUIT)
    straight to stdout, past logging, like its banner: under ``LOG_FORMAT=json`` it was the
    last plain-text line of every worker. Its own handlers are installed again here, the same
    ones with the line turned off (``verbose``); the worker_shutting_down signal they send
    writes the log line instead. Nothing else about the shutdown changes.
    """

    def install_platform_tweaks(self, worker: Any) -> None:
        super().install_platform_tweaks(worker)
        celery_worker.install_worker_term_handler(worker, verbose=False)
        celery_worker.install_worker_term_hard_handler(worker, verbose=False)
        celery_worker.install_worker_int_handler(worker, verbose=False)


class _Beat(celery_beat.Beat):
    """``celery beat``, its start one line of the project's log (``beat.starting``).

    Celery prints "celery beat v... is starting." and its banner (art, then the broker, loader,
    scheduler, log file and interval, one per line) straight to stdout, past logging, like the
    worker's: under ``LOG_FORMAT=json`` they were the only beat lines that were not JSON. Quiet,
    as ``celery beat -q`` is, it prints neither; :func:`_beat_start_line` says the same facts.
    """

    def run(self) -> None:
        self.quiet = True
        super().run()


class _Celery(Celery):
    @cached_property
    def Worker(self) -> type[celery_worker.Worker]:  # noqa: N802 - Celery's name
        return self.subclass_with_self(_Worker)

    @cached_property
    def Beat(self) -> type[celery_beat.Beat]:  # noqa: N802 - Celery's name
        return self.subclass_with_self(_Beat)


# Celery's Django fix-up, except that workers keep their database connections across tasks
# (see config/celery_fixup.py).
app = _Celery("sagarunner", fixups=["config.celery_fixup:fixup"])
app.config_from_object(_CeleryNamespace())
app.autodiscover_tasks()


@worker_ready.connect
def _after_logging_setup(**_kwargs) -> None:
    _quiet_cancel_warning()


@after_setup_logger.connect
def _pool_lines_in_the_log(logger: logging.Logger | None = None, **_kwargs: Any) -> None:
    """The prefork pool's own lines (``Process 'ForkPoolWorker-1' pid:123 exited with 'signal 9
    (SIGKILL)'``) through the project's log handlers, as JSON or key=value like every other
    line. They go through the ``multiprocessing`` logger, which does not propagate, and Celery
    gives it a plain-text handler of its own whenever it has none."""
    root = logger or logging.getLogger()
    logging.getLogger("multiprocessing").handlers = list(root.handlers)


@celeryd_init.connect
def _warnings_in_the_log_from_the_start(**_kwargs) -> None:
    """Python warnings go to the log (``py.warnings``) from here, as Celery sends them once its
    logging is set up, a moment later.

    In between, the worker checks who it runs as: as root it warns (SecurityWarning, eight
    lines of text) through Python's default warning printer, before the JSON ``worker.starting``
    line. This signal comes just before that check, with the project's logging configured.
    """
    logging.captureWarnings(True)


#: What the shutdown signal handler learnt (node, signal, warm, exit code), for the line.
_stop_request: dict[str, Any] = {}


@worker_shutting_down.connect
def _stop_requested(sender: Any = None, sig: str = "", how: str = "", **kwargs: Any) -> None:
    """Note the stop Celery's shutdown handler is acting on, for :func:`_stopping_line`.

    This runs inside the POSIX signal handler: writing a log line here could re-enter a
    stream the interrupted code was writing to (``RuntimeError: reentrant call``, and a
    plain-text "Logging error" in place of the line), which is why Celery's own handler writes
    with a raw ``os.write``. The first request is the one said (a cold stop, which ends
    without ``worker_shutdown``, says nothing)."""
    if not _stop_request:
        _stop_request.update(node=str(sender), signal=sig, shutdown=how.lower())
        _stop_request["exitcode"] = kwargs.get("exitcode")


@worker_shutdown.connect
def _stopping_line(sender: Any = None, **_kwargs: Any) -> None:
    """The worker's stop in the project's log, in place of Celery's "Warm shutdown" line
    (see :class:`_Worker`), written from the worker's own stop, outside any signal handler:
    a warm stop has let the running tasks finish by now."""
    import structlog

    facts = _stop_request or {"node": str(getattr(sender, "hostname", sender))}
    structlog.get_logger("config.celery").info("worker.stopping", **facts)


@celeryd_after_setup.connect
def _start_line_instead_of_banner(sender: Any = None, instance: Any = None, **_kwargs) -> None:
    """One line of the project's log in place of Celery's start banner, with its facts.

    Celery prints the banner (ASCII art, the configuration, the queues, the task list) straight
    to stdout, past logging: with ``LOG_FORMAT=json`` those twenty-odd lines were the only ones
    that were not JSON, and a log shipper took each for an event of its own. This signal comes
    after the worker is set up (``-Q`` applied) and before it prints the banner; marking the
    worker quiet, as ``celery -q worker`` does, leaves the line here as its start line.
    """
    if instance is None:
        return
    import structlog
    from celery import __version__

    instance.quiet = True
    app = instance.app
    pool = instance.pool_cls if isinstance(instance.pool_cls, str) else instance.pool_cls.__module__
    facts: dict[str, Any] = {
        "node": str(sender),
        "celery": __version__,
        "transport": app.connection().as_uri(),  # without its password
        "results": app.backend.as_uri(),
        "pool": pool.rsplit(".", 1)[-1],
        "concurrency": instance.concurrency,
        "queues": sorted(app.amqp.queues.consume_from),
        "task_events": bool(instance.task_events),
        "tasks": sorted(name for name in app.tasks if not name.startswith("celery.")),
    }
    if getattr(instance, "autoscale", None):
        facts["autoscale"] = {"max": instance.autoscale[0], "min": instance.autoscale[1]}
    structlog.get_logger("config.celery").info("worker.starting", **facts)


@worker_ready.connect
def _serve_metrics(**_kwargs) -> None:
    """With ``WORKER_METRICS_PORT`` set, the worker serves its processes' counters (a container
    whose metrics directory web cannot read: see docs/operations.md, "Running on many machines")."""
    from django.conf import settings

    if settings.WORKER_METRICS_PORT:
        from sagas.metrics import serve_worker_metrics

        serve_worker_metrics(settings.WORKER_METRICS_PORT)


@worker_init.connect
def _validate_faults_at_start(**_kwargs) -> None:
    """Parse ``SAGA_FAULTS`` once in the parent so a malformed value stops the worker early:
    before its pool forks and before it looks for the broker. Checked once the worker was
    ready, it left pool children whose pipe to the parent broke (a ``BrokenPipeError``
    traceback, twice, under the refusal), and a worker whose broker was down never got that
    far."""
    from sagas.faults import load_faults_or_exit

    load_faults_or_exit()


@worker_init.connect
def _validate_providers_at_start(**_kwargs) -> None:
    """Parse ``SAGA_PROVIDERS`` in the parent, before the pool forks: a typo stops the worker
    with its name, as docs/providers.md says, instead of failing each saga at its first call
    to that provider."""
    from django.core.exceptions import ImproperlyConfigured

    from providers.config import check_provider_settings
    from sagas.definition import registered_definitions

    known = {
        step.provider
        for definition in registered_definitions()
        for step in definition.steps
        if getattr(step, "provider", None)
    }
    try:
        check_provider_settings(known)
    except ImproperlyConfigured as exc:
        _refuse_to_start(str(exc))


def _refuse_to_start(message: str) -> None:
    sys.stderr.write(f"sagarunner: refusing to start: {message}\n")
    sys.stderr.flush()
    os._exit(2)


@worker_init.connect
def _refuse_unknown_definitions(**_kwargs) -> None:
    """Stop a worker whose code lacks (or changed) the definition of an unfinished saga.

    Celery runs Django's system checks at start but does not act on their result; this runs
    the sagas check and exits with its message, as ``manage.py check`` would.
    """
    from django.db import DatabaseError, connection, connections

    from sagas.checks import check_saga_definitions

    try:
        connection.ensure_connection()
    except DatabaseError as exc:
        _warn_database_unreachable(exc)
        return  # nothing to check against; the pool's first task connects again
    errors = check_saga_definitions()
    for conn in connections.all(initialized_only=True):
        conn.close()  # the pool forks after this: no socket shared with the children
    if errors:
        _refuse_to_start("\n".join(f"{e.msg}\n  HINT: {e.hint}" for e in errors))


def _warn_database_unreachable(exc: Exception) -> None:
    """Say so at start, once, when the database does not answer. The worker still starts (a
    database that comes up after it, as in a compose file, costs nothing): its tasks connect
    again each time. Before this line it said "ready" and nothing else until a saga came, and
    then only that saga's error."""
    import structlog

    structlog.get_logger("config.celery").error(
        "worker.database_unreachable",
        error=str(exc).strip()[:300],
        hint="sagas wait until the database answers; check DATABASE_URL and that PostgreSQL is up",
    )


@worker_init.connect
def _tracing_in_a_pool_without_fork(sender=None, **_kwargs) -> None:
    """Threads, solo and gevent pools run tasks in this process: trace here (if OTEL_* asks)."""
    pool = getattr(sender, "pool_cls", None)
    if pool is not None and "prefork" not in f"{getattr(pool, '__module__', pool)}":
        from config.tracing import setup_tracing

        setup_tracing("worker")


@worker_process_init.connect
def _tracing_in_a_pool_process(**_kwargs) -> None:
    """A prefork child sets tracing up after the fork (a batch exporter's thread does not
    survive one)."""
    from config.tracing import setup_tracing

    setup_tracing("worker")


@beat_init.connect
def _beat_start_line(sender: Any = None, **_kwargs: Any) -> None:
    """Beat's banner as one line (see :class:`_Beat`), once its logging is set up: the broker
    (without its password), the scheduler, its longest sleep and the entries it will send."""
    import structlog
    from celery import __version__

    scheduler = sender.scheduler
    with sender.app.connection() as broker:  # not connected: only its address is read
        transport = broker.as_uri()
    structlog.get_logger("config.celery").info(
        "beat.starting",
        celery=__version__,
        transport=transport,
        scheduler=f"{type(scheduler).__module__}.{type(scheduler).__qualname__}",
        max_interval=scheduler.max_interval,
        entries=sorted(scheduler.schedule),
    )


@beat_init.connect
def _tracing_in_beat(**_kwargs) -> None:
    from config.tracing import setup_tracing

    setup_tracing("beat")


@worker_process_init.connect
def _reset_db_connections(**_kwargs) -> None:
    """A forked child must not share the parent's database socket."""
    from django.db import connections

    for conn in connections.all(initialized_only=True):
        conn.inc_thread_sharing()
        conn.close()
