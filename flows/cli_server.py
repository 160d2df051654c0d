"""`featureatlas server start|stop|status`: the Prefect and MLflow servers for users without containers."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer
from rich.table import Table

from featureatlas.flows.cli_common import console, fail
from featureatlas.flows.cli_common import settings as current_settings

server_app = typer.Typer(
    help="Run a Prefect server and an MLflow server on 127.0.0.1 against the configured database.",
    no_args_is_help=True,
)
_ONLY = typer.Option("--only", help="Just this server: prefect or mlflow (default: both).")


def _names(only: str | None) -> tuple[str, ...]:
    from featureatlas.tasks.tracking.servers import NAMES

    if only is None:
        return NAMES
    if only not in NAMES:
        raise typer.BadParameter(f"{only!r} is not a server; choose one of {', '.join(NAMES)}")
    return (only,)


def _print(statuses, as_json: bool) -> None:
    if as_json:
        rows = [{"name": s.name, "url": s.url, "pid": s.pid, "running": s.running, "healthy": s.healthy,
                 "log": str(s.log)} for s in statuses]  # fmt: skip
        print(json.dumps(rows, indent=1))
        return
    table = Table(title="featureatlas servers")
    for col in ("server", "url", "pid", "state", "log"):
        table.add_column(col)
    for s in statuses:
        state = "healthy" if s.healthy else ("running, not answering" if s.running else "stopped")
        table.add_row(s.name, s.url, str(s.pid or ""), state, str(s.log))
    console.print(table)
    urls = {s.name: s.url for s in statuses if s.healthy}
    if urls:
        console.print("Point pipelines at them with:", markup=False)
        if "mlflow" in urls:
            console.print(f"  export FEATUREATLAS_MLFLOW_TRACKING_URI={urls['mlflow']}", markup=False)
        if "prefect" in urls:
            console.print(f"  export FEATUREATLAS_PREFECT_API_URL={urls['prefect']}", markup=False)


@server_app.command("start")
def start(
    host: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="Interface to bind (default 127.0.0.1; anything else exposes the servers)."),
    ] = None,
    mlflow_port: Annotated[Optional[int], typer.Option(help="MLflow port (default 5000).")] = None,  # noqa: UP045
    prefect_port: Annotated[Optional[int], typer.Option(help="Prefect port (default 4200).")] = None,  # noqa: UP045
    only: Annotated[Optional[str], _ONLY] = None,  # noqa: UP045
    timeout: Annotated[float, typer.Option(help="Seconds to wait for each to answer.")] = 300,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Start the servers in the background (pid files and logs in <home>/server) and wait until healthy."""
    from featureatlas.tasks.tracking.servers import start as start_servers

    settings = current_settings()
    try:
        statuses = start_servers(
            settings,
            host=host or settings.server_host,
            mlflow_port=mlflow_port or settings.mlflow_port,
            prefect_port=prefect_port or settings.prefect_port,
            only=_names(only),
            timeout=timeout,
        )
    except RuntimeError as e:
        raise fail(str(e)) from None
    _print(statuses, as_json)


@server_app.command("stop")
def stop(only: Annotated[Optional[str], _ONLY] = None) -> None:  # noqa: UP045
    """Stop the servers that `featureatlas server start` started."""
    from featureatlas.tasks.tracking.servers import stop as stop_servers

    stopped = stop_servers(current_settings(), only=_names(only))
    console.print(f"stopped: {', '.join(stopped)}" if stopped else "no server was running")


@server_app.command("status")
def status(as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False) -> None:
    """Each server's URL, pid and health; exits 1 when one is recorded but not healthy."""
    from featureatlas.tasks.tracking.servers import status as server_status

    statuses = server_status(current_settings())
    _print(statuses, as_json)
    if any(s.pid is not None and not s.healthy for s in statuses):
        raise typer.Exit(1)
