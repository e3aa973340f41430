"""Celery tasks of the engine: thin, they take ids and hand over to :mod:`sagas.engine`."""

from celery import shared_task


@shared_task(name="sagas.run", ignore_result=True, acks_late=True)
def run_saga(saga_id: str, version: int) -> None:
    """The doorbell: saga ``saga_id`` at ``version`` may have work now."""
    from sagas.engine import advance

    advance(saga_id, version)


@shared_task(name="sagas.sweep", ignore_result=True)
def sweep_sagas() -> dict[str, int]:
    """Beat: ring for overdue sagas and time out those past their deadline."""
    from sagas.engine import sweep

    return sweep()
