"""Celery tasks of the accounts app: thin, they call the code they run."""

from __future__ import annotations

from celery import shared_task

from accounts.throttling import purge_ended_windows
from config.periodic import missed_run_is_one_line


@shared_task(name="accounts.purge_rate_limit_counts", ignore_result=True)
def purge_rate_limit_counts() -> int | None:
    """Beat: delete the rate limits' database counts whose window has ended (a no-op with a
    Redis cache, which counts in Redis)."""
    with missed_run_is_one_line("accounts.purge_rate_limit_counts"):
        return purge_ended_windows()
    return None
