"""The `featureatlas` command line: run pipelines, open the MLflow UI, browse the catalog.

Each command builds a spec or a query and calls a flow or the catalog; nothing else happens here.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from importlib import resources
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from featureatlas.flows.cli_catalog import catalog_app
from featureatlas.flows.cli_common import console, conventional_help, fail
from featureatlas.flows.cli_common import open_catalog_from_settings as _catalog
from featureatlas.flows.cli_common import settings as current_settings
from featureatlas.flows.cli_dashboard import dashboard
from featureatlas.flows.cli_output import print_plan, print_result
from featureatlas.flows.cli_schedule import runs, schedule_app, worker
from featureatlas.flows.cli_server import server_app
from featureatlas.schemas.settings import Settings
from featureatlas.schemas.spec import SpecError, load_spec
from featureatlas.tasks.tracking.env import configure_environment

app = typer.Typer(
    help="featureatlas: declarative, tracked pipelines for finding features in neural networks.",
    no_args_is_help=True,
    add_completion=False,
    # errors end in one line and the log's path (`run_cli`); `--debug` shows the traceback
    pretty_exceptions_enable=False,
)
features_app = typer.Typer(help="Search labeled features across dictionaries.", no_args_is_help=True)
conventional_help()


def demo_spec_path() -> Path:
    return Path(str(resources.files("featureatlas.flows") / "pipelines" / "demo.yaml"))


def _run(spec_path: Path, plan: bool, as_json: bool) -> None:
    settings = current_settings()
    try:
        spec = load_spec(spec_path)
    except SpecError as e:
        raise fail(str(e), 2) from None
    if plan:
        print_plan(spec, settings, as_json)
        return
    from featureatlas.flows.pipeline import pipeline_flow
    from featureatlas.flows.plan import preflight
    from featureatlas.tasks.tracking.run_server import run_server

    try:  # before Prefect starts: what cannot run is refused in a second
        preflight(spec, settings)
    except (ValueError, FileNotFoundError) as e:
        raise fail(str(e), 2) from None
    with run_server(settings):  # a temporary Prefect server that dies with this process, however it dies
        result = pipeline_flow(spec, progress=sys.stderr.isatty() and not as_json)
    if as_json:
        print(json.dumps(result.model_dump(mode="json"), indent=1))
    else:
        print_result(result, settings)
    if result.failures:
        from featureatlas.tasks.tracking.members import summary

        for line in summary(result):
            typer.secho(line, err=True, fg="red" if line.startswith("FAILED") else None)
        raise fail(f"{len(result.failures)} stage(s) of the sweep failed; the others finished (see above)")


def run(
    spec: Annotated[Path, typer.Argument(help="Pipeline spec (YAML).")],
    plan: Annotated[
        bool, typer.Option("--plan", help="Print the DAG, fingerprints and reuse; run nothing.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Run a pipeline spec as a Prefect flow (finished stages with matching fingerprints are reused)."""
    _run(spec, plan, as_json)


def demo(
    plan: Annotated[bool, typer.Option("--plan", help="Print the demo's DAG; run nothing.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Run the embedded default pipeline: SmolLM2-135M, text shipped with Python, a TopK SAE."""
    _run(demo_spec_path(), plan, as_json)


def ui(
    port: Annotated[int, typer.Option(metavar="PORT", help="Port to listen on.")] = 5000,
    host: Annotated[str, typer.Option(metavar="HOST", help="Interface to listen on.")] = "127.0.0.1",
) -> None:
    """Open the MLflow UI on the featureatlas store (runs nested per pipeline, inputs show lineage).

    Prints the server's address and the URL of the experiment's runs table in model-training mode, with
    each dictionary's FVU, L0 and CE-loss score as columns.
    """
    from featureatlas.flows.cli_process import port_in_use, run_child
    from featureatlas.tasks.tracking.lineage import runs_table_route
    from featureatlas.tasks.tracking.secrets import mask_url
    from featureatlas.tasks.tracking.stage import tracker_for

    settings = current_settings()
    if port_in_use(host, port):
        raise fail(
            f"port {port} on {host} is already in use; pass --port with a free one (or stop what uses it)"
        )
    address = f"http://{host}:{port}"
    # the experiment is created here if no pipeline ran yet, so the runs table's URL opens either way
    experiment_id = tracker_for(settings).experiment_id
    console.print(
        f"MLflow UI on {address} (store {mask_url(settings.mlflow_uri)}); Ctrl-C stops it", markup=False
    )
    console.print(f"runs table: {address}/{runs_table_route(experiment_id)}", markup=False)
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(port), "--workers", "1"]
    # the store URL may hold a password: through the environment, never on a command line `ps` shows
    env = os.environ.copy() | {"MLFLOW_BACKEND_STORE_URI": settings.mlflow_uri}
    raise typer.Exit(run_child(cmd, env))


def features_search(
    text: Annotated[str, typer.Argument(help="Text to find in feature labels (case-insensitive).")],
    limit: Annotated[int, typer.Option(help="Most results shown.")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Features of every labeled dictionary whose label contains TEXT, best detection score first."""
    from featureatlas.tasks.labeling.lookup import search_labels

    hits = search_labels(_catalog(), text, limit)
    if as_json:
        print(json.dumps(hits, indent=1))
        return
    table = Table(title=f"features matching {text!r}")
    for col in ("dictionary", "latent", "label", "frequency", "detection", "page"):
        table.add_column(col)
    for h in hits:
        score = "" if h["detection_score"] is None else f"{h['detection_score']:.2f}"
        table.add_row(
            h["dictionary_id"], str(h["latent"]), h["label"], f"{h['frequency']:.5f}", score, h["page"] or ""
        )
    console.print(table)


def compare(
    out: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option("--out", help="Folder for compare.csv and frontier.png (default: <artifacts>/compare)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable table.")] = False,
) -> None:
    """Table of every evaluated dictionary and frontier plots (FVU, CE-loss score, dead fraction vs L0)."""
    from featureatlas.tasks.evaluate.compare import (
        comparison_rows,
        frontier_plot,
        log_comparison,
        write_table,
    )

    settings = current_settings()
    rows = comparison_rows(_catalog())
    if not rows:
        raise fail("no evaluated dictionaries in the catalog; run a pipeline with `evaluate` enabled first")
    out = out or settings.artifacts_dir / "compare"
    out.mkdir(parents=True, exist_ok=True)
    files = [write_table(rows, out / "compare.csv"), frontier_plot(rows, out / "frontier.png")]
    run_id = log_comparison(settings, rows, files)
    if as_json:
        print(
            json.dumps({"rows": [r.model_dump() for r in rows], "files": [str(f) for f in files]}, indent=1)
        )
        return
    table = Table(title=f"{len(rows)} evaluated dictionaries")
    columns = ["dictionary_id", "method", "hookpoint", "d_sae", "l0", "fvu", "ce_loss_score",
               "ce_loss_score_mean", "dead_fraction", "dense_fraction", "ioi_sufficiency"]  # fmt: skip
    for col in columns:
        table.add_column(col)
    for r in rows:
        table.add_row(
            *(f"{v:.4g}" if isinstance(v, float) else str(v) for v in (getattr(r, c) for c in columns))
        )
    console.print(table)
    console.print(f"plots: {files[1]}\ntable: {files[0]}\nMLflow run: {run_id}")


@app.callback()
def options(
    debug: Annotated[
        bool,
        typer.Option("--debug", help="Show tracebacks and the services' start-up logs."),
    ] = False,
) -> None:
    """featureatlas: declarative, tracked pipelines for finding features in neural networks."""


# commands in the order a user meets them: run, look at the results, then operate the services
_RUN, _LOOK, _OPERATE = "Run pipelines", "Look at results", "Operate"
app.command(rich_help_panel=_RUN)(run)
app.command(rich_help_panel=_RUN)(demo)
app.add_typer(catalog_app, name="catalog", rich_help_panel=_LOOK)
app.command(rich_help_panel=_LOOK)(compare)
app.add_typer(features_app, name="features", rich_help_panel=_LOOK)
features_app.command("search")(features_search)
app.command(rich_help_panel=_LOOK)(dashboard)
app.command(rich_help_panel=_LOOK)(ui)
app.command(rich_help_panel=_OPERATE)(runs)
app.add_typer(schedule_app, name="schedule", rich_help_panel=_OPERATE)
app.command(rich_help_panel=_OPERATE)(worker)
app.add_typer(server_app, name="server", rich_help_panel=_OPERATE)


def run_cli(argv: list[str] | None = None) -> int:
    """Run one command; an error ends in one line and the path of the command's full log.

    `--debug` (anywhere on the line) shows the traceback and the orchestration stack's own logs instead.
    """
    from featureatlas.flows.cli_log import PREFECT_COMMANDS, CommandLog
    from featureatlas.tasks.tracking.members import one_line
    from featureatlas.tasks.tracking.retry import ServiceUnavailable

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    settings = configure_environment(Settings())
    command = next((a for a in argv if not a.startswith("-")), "")
    if not debug:  # MLflow's store migrations log at INFO through a handler of its own
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    if command in PREFECT_COMMANDS:  # Prefect's console handler first; the command log's filters go on it
        from prefect.logging.configuration import ensure_logging_setup

        ensure_logging_setup()
    log = CommandLog(settings, command, debug).start()
    try:
        app(args=argv, prog_name="featureatlas")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except KeyboardInterrupt:
        typer.secho("interrupted", err=True, fg="red")
        return 130
    except Exception as e:
        log.failure(f"featureatlas {' '.join(argv)} failed", e)
        if debug:
            traceback.print_exception(e)
        elif isinstance(e, ServiceUnavailable):  # the database or tracking server is down: it says which
            typer.secho(str(e), err=True, fg="red")
        else:
            typer.secho(f"error: {one_line(e)}", err=True, fg="red")
        typer.secho(f"full log: {log.path}", err=True)
        return 1
    finally:
        log.stop()
    return 0


def main() -> None:
    raise SystemExit(run_cli())


if __name__ == "__main__":  # python -m featureatlas.flows.cli, the same as the featureatlas command
    main()
