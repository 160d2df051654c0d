"""`featureatlas schedule`, `worker` and `runs`: pipelines on a schedule, served by a Prefect worker."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from featureatlas.flows.cli_common import console, fail
from featureatlas.flows.cli_common import settings as current_settings
from featureatlas.flows.schedules import WORK_POOL, ScheduleError
from featureatlas.schemas.spec import SpecError, load_spec


def schedule(
    spec: Annotated[Path, typer.Argument(help="Pipeline spec (YAML).")],
    cron: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--cron", help='Cron schedule, e.g. "0 3 * * *" (03:00 every day, UTC).'),
    ] = None,
    interval: Annotated[
        Optional[float],  # noqa: UP045
        typer.Option("--interval", help="Run every SECONDS instead of a cron schedule."),
    ] = None,
    name: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--name", help="Deployment name (default: the spec's name)."),
    ] = None,
    pool: Annotated[str, typer.Option("--pool", help="Process work pool the worker serves.")] = WORK_POOL,
) -> None:
    """Register SPEC as a Prefect deployment on a schedule; `featureatlas worker` runs it when due."""
    from featureatlas.flows.schedules import register_schedule

    current_settings()
    try:
        parsed = load_spec(spec)
    except SpecError as e:
        raise fail(str(e), 2) from None
    try:
        done = register_schedule(parsed, name=name, cron=cron, interval=interval, pool=pool)
    except ScheduleError as e:
        raise fail(str(e), 2) from None
    console.print(
        f"deployment {done.name} ({done.deployment_id}) runs {done.schedule} on work pool "
        f"{done.work_pool!r}; "
        f"serve it with `featureatlas worker --pool {done.work_pool}`"
    )


def worker(
    pool: Annotated[str, typer.Option("--pool", help="Work pool to serve.")] = WORK_POOL,
    limit: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option("--limit", help="Most flow runs at once (default: no limit)."),
    ] = None,
) -> None:
    """Serve scheduled pipelines: a Prefect process worker, each run in a new process. Ctrl-C stops it."""
    from featureatlas.flows.schedules import api_url, worker_command, worker_environment

    settings = current_settings()
    try:
        url = api_url()
    except ScheduleError as e:
        raise fail(str(e), 2) from None
    console.print(f"worker for pool {pool!r} on {url}; state under {settings.home_dir}")
    raise typer.Exit(subprocess.call(worker_command(pool, limit), env=worker_environment(settings)))


def runs(
    limit: Annotated[int, typer.Option(help="Most runs shown.")] = 20,
    upcoming: Annotated[
        bool, typer.Option("--upcoming", help="Also the future runs that schedules have created.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    repair: Annotated[
        bool,
        typer.Option("--repair", help="Mark KILLED the MLflow runs left RUNNING by processes that died."),
    ] = False,
) -> None:
    """Pipeline flow runs that are due (finished, running, waiting) with their states, newest first."""
    from featureatlas.flows.schedules import list_runs

    settings = current_settings()
    if repair:
        from featureatlas.tasks.tracking.stage import tracker_for

        killed = tracker_for(settings).reap_orphans()
        console.print(f"{len(killed)} MLflow runs of dead processes marked KILLED" + "".join(
            f"\n  {run_id}" for run_id in killed))  # fmt: skip
        return
    rows = list_runs(limit, upcoming)
    if as_json:
        print(json.dumps([r._asdict() for r in rows], indent=1))
        return
    table = Table(title=f"{len(rows)} flow runs")
    for col in ("flow run", "deployment", "state", "expected start", "start", "end"):
        table.add_column(col)
    for r in rows:
        table.add_row(r.name, r.deployment or "", r.state, r.expected_start or "", r.start or "", r.end or "")
    console.print(table)
