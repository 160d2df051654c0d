"""`featureatlas schedule`, `worker` and `runs`: pipelines on a schedule, served by a Prefect worker.

`schedule add SPEC --cron ...` (or, as before, `schedule SPEC --cron ...`) registers a deployment;
`schedule list|pause|resume|delete` manage them. The worker runs as a child that gets the CLI's signals.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table
from typer.core import TyperGroup

from featureatlas.flows.cli_common import console, fail
from featureatlas.flows.cli_common import settings as current_settings
from featureatlas.flows.schedules import WORK_POOL, ScheduleError
from featureatlas.schemas.spec import SpecError, load_spec


class _ScheduleGroup(TyperGroup):
    """`schedule SPEC ...` keeps working as `schedule add SPEC ...`."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        if args and not args[0].startswith("-") and args[0] not in self.commands:
            args = ["add", *args]
        return super().parse_args(ctx, args)


schedule_app = typer.Typer(
    cls=_ScheduleGroup,
    help="Pipelines on a schedule: add one, list, pause, resume or delete them (needs a Prefect server).",
    no_args_is_help=True,
)


@schedule_app.command("add")
def schedule(
    spec: Annotated[Path, typer.Argument(metavar="SPEC", help="Pipeline spec (YAML).")],
    cron: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            "--cron", metavar="CRON", help='Cron schedule, e.g. "0 3 * * *" (03:00 every day, UTC).'
        ),
    ] = None,
    interval: Annotated[
        Optional[float],  # noqa: UP045
        typer.Option("--interval", metavar="SECONDS", help="Run every SECONDS instead of a cron schedule."),
    ] = None,
    name: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--name", metavar="NAME", help="Deployment name (default: the spec's name)."),
    ] = None,
    pool: Annotated[
        str, typer.Option("--pool", metavar="POOL", help="Process work pool the worker serves.")
    ] = WORK_POOL,
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
    pool: Annotated[str, typer.Option("--pool", metavar="POOL", help="Work pool to serve.")] = WORK_POOL,
    limit: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option("--limit", metavar="N", help="Most flow runs at once (default: no limit)."),
    ] = None,
) -> None:
    """Serve scheduled pipelines: a Prefect process worker, each run in a new process. Ctrl-C stops it."""
    from featureatlas.flows.cli_process import run_child
    from featureatlas.flows.schedules import api_url, worker_command, worker_environment

    settings = current_settings()
    try:
        url = api_url()
    except ScheduleError as e:
        raise fail(str(e), 2) from None
    console.print(f"worker for pool {pool!r} on {url}; state under {settings.home_dir}")
    raise typer.Exit(run_child(worker_command(pool, limit), worker_environment(settings)))


def runs(
    limit: Annotated[int, typer.Option(metavar="N", help="Most runs shown.")] = 20,
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
    for col in ("run", "schedule", "state", "expected start", "start", "end"):
        table.add_column(col)
    for r in rows:
        table.add_row(r.name, r.deployment or "", r.state, r.expected_start or "", r.start or "", r.end or "")
    console.print(table)


def _schedule_action(name: str, action: str) -> None:
    from featureatlas.flows.schedules import set_schedule

    current_settings()
    try:
        row = set_schedule(name, action)
    except ScheduleError as e:
        raise fail(str(e), 2) from None
    done = {"pause": "paused", "resume": "resumed", "delete": "deleted"}[action]
    console.print(f"{done} {row.name} ({row.schedule})", markup=False)


_NAME = typer.Argument(metavar="NAME", help="Schedule name, as `featureatlas schedule list` shows it.")


@schedule_app.command("list")
def schedule_list(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """The registered schedules: name, timing, paused or active, work pool."""
    from featureatlas.flows.schedules import list_schedules

    current_settings()
    try:
        rows = list_schedules()
    except ScheduleError as e:
        raise fail(str(e), 2) from None
    if as_json:
        print(json.dumps([r._asdict() for r in rows], indent=1))
        return
    table = Table(title=f"{len(rows)} schedules")
    for col in ("name", "schedule", "state", "work pool", "id"):
        table.add_column(col)
    for r in rows:
        table.add_row(r.name, r.schedule, "paused" if r.paused else "active", r.work_pool or "", r.id)
    console.print(table)


@schedule_app.command("pause")
def schedule_pause(name: Annotated[str, _NAME]) -> None:
    """Stop a schedule from creating runs (its deployment stays)."""
    _schedule_action(name, "pause")


@schedule_app.command("resume")
def schedule_resume(name: Annotated[str, _NAME]) -> None:
    """Let a paused schedule create runs again."""
    _schedule_action(name, "resume")


@schedule_app.command("delete")
def schedule_delete(name: Annotated[str, _NAME]) -> None:
    """Delete a schedule (its deployment); finished runs and artifacts stay."""
    _schedule_action(name, "delete")
