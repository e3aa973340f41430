"""Celery tasks of the engine: thin, they take ids and hand over to the runner and the sweeper.

The top of the engine: nothing in it imports this module. The doorbell sends the run task by
its name (:data:`sagas.doorbell.RUN_TASK`); the sagas app imports this module when it is ready,
so every process that rings has the task registered.
"""

from celery import Task, shared_task
from django.conf import settings

from config.periodic import missed_run_is_one_line
from sagas.doorbell import PUMP_HEADER, RUN_TASK
from sagas.runner import advance
from sagas.sweeper import sweep


@shared_task(name=RUN_TASK, ignore_result=True, acks_late=True, bind=True)
def run_saga(self: Task, saga_id: str, version: int) -> None:
    """The doorbell: saga ``saga_id`` at ``version`` may have work now.

    A doorbell carries time limits that fit the longest step its task may run; the task hands
    that timeout to the engine, which sizes the lease from it. A doorbell with a pump
    slot (its ``saga_pump`` header, see :mod:`sagas.pumps`) goes on to other due sagas.
    """
    soft = (self.request.timelimit or (None, None))[1]
    # A message without limits runs under the annotations' (CELERY_TASK_ANNOTATIONS).
    timeout = (
        settings.SAGA_STEP_TIMEOUT if soft is None else float(soft) - settings.SAGA_INLINE_BUDGET
    )
    advance(saga_id, version, timeout, pump=self.request.get(PUMP_HEADER))


@shared_task(name="sagas.sweep", ignore_result=True)
def sweep_sagas() -> dict[str, int] | None:
    """Beat: ring for overdue sagas and time out those past their deadline (a run the database
    does not answer is one warning line: the next tick sweeps)."""
    with missed_run_is_one_line("sagas.sweep"):
        return sweep()
    return None
