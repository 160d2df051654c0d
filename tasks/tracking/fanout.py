"""Fan independent stage jobs out through a Prefect task runner chosen by the settings.

The jobs of a sweep do not depend on each other (the trainings of its groups, one pass over the cache per
hookpoint and batch order; then each dictionary's evaluation and labeling), so they are submitted together:
to a `ThreadPoolTaskRunner` in the flow's process (`task_runner: threads`, the default), or to a Dask
cluster through `prefect-dask` (`task_runner: dask`), either a running one (`dask_address`) or a local
cluster of `max_workers` worker processes on 127.0.0.1. With threads and
`max_workers: 1` the tasks are simply called in order in the flow's thread, as before fan-out existed.
Results come back in submission order, so the pipeline's result does not depend on which job ends first.
Evaluation and labeling hook into the process's one cached language model, so a thread pool runs them in
turn and only trainings overlap; Dask workers are separate processes (one thread each: a cluster of your
own should start its workers with `--nthreads 1`), where all three fan out.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from prefect import Task
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from featureatlas.schemas.settings import Settings

# Dask workers sample their threads' stacks every 10 ms for the dashboard's profile (sys._current_frames).
# On Python before 3.12 that call can deadlock a worker: it holds the interpreter's thread-list lock while
# allocating, a garbage collection it triggers can run a finalizer that needs the same lock, and the task
# thread then waits for the GIL forever (CPython gh-106883; seen here as an evaluation stuck for minutes).
# Workers started by featureatlas run with the profiler off; start your own with
# DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED=False.
DASK_WORKER_CONFIG = {"distributed.worker.profile.enabled": False}


@contextlib.contextmanager
def dask_worker_config() -> Iterator[None]:
    """Dask settings for worker processes started inside the block (nannies hand them to the workers)."""
    import dask

    with dask.config.set(DASK_WORKER_CONFIG):
        yield


def task_runner_for(settings: Settings) -> TaskRunner | None:
    """The runner the settings ask for; None means "call the tasks in turn"."""
    if settings.task_runner == "dask":
        from prefect_dask import DaskTaskRunner

        if settings.dask_address:
            return DaskTaskRunner(address=settings.dask_address)
        return DaskTaskRunner(
            cluster_class="distributed.LocalCluster",
            cluster_kwargs={
                "n_workers": settings.max_workers,
                "threads_per_worker": 1,  # torch already uses the cores inside one job
                "processes": True,
                "host": "127.0.0.1",  # never listen beyond this machine unless told (dask_address)
                "dashboard_address": None,
            },
        )
    if settings.max_workers == 1:
        return None
    return ThreadPoolTaskRunner(max_workers=settings.max_workers)


class TaskPool:
    """Runs a batch of calls of one task and returns their results in order; a failed call fails the batch."""

    def __init__(self, runner: TaskRunner | None) -> None:
        self.runner = runner

    def run_all(self, task: Task, calls: list[dict[str, Any]], shares_model: bool = False) -> list[Any]:
        """`shares_model`: the tasks splice hooks into the language model, which is loaded once per process
        and shared, so threads would see each other's hooks; in a thread pool they then run in turn."""
        in_threads = isinstance(self.runner, ThreadPoolTaskRunner)
        if self.runner is None or (shares_model and in_threads):
            return [task(**params) for params in calls]
        futures = [self.runner.submit(task, params) for params in calls]
        return [future.result() for future in futures]

    def run_each(self, task: Task, calls: list[dict[str, Any]], shares_model: bool = False) -> list[Any]:
        """As `run_all`, but every call runs to its end: a failed call leaves its exception in its place
        instead of failing the batch, so independent jobs (a sweep's members) fail independently."""
        in_threads = isinstance(self.runner, ThreadPoolTaskRunner)
        if self.runner is None or (shares_model and in_threads):
            states = [task(**params, return_state=True) for params in calls]
            return [state.result(raise_on_failure=False) for state in states]
        futures = [self.runner.submit(task, params) for params in calls]
        return [future.result(raise_on_failure=False) for future in futures]


@contextlib.contextmanager
def task_pool(settings: Settings) -> Iterator[TaskPool]:
    """A `TaskPool` on the settings' runner, started for the block and shut down after it."""
    runner = task_runner_for(settings)
    if runner is None:
        yield TaskPool(None)
        return
    config = dask_worker_config() if settings.task_runner == "dask" else contextlib.nullcontext()
    with config, runner:
        yield TaskPool(runner)
