"""`featureatlas catalog ...`: list (with the columns that tell dictionaries apart), show, trace the lineage
of, and remove registered artifacts. `catalog list` formats the frame of
`tasks/tracking/catalog_view.py::list_artifacts`, the one `featureatlas.catalog().list()` returns."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table
from rich.tree import Tree

from featureatlas.flows.cli_common import console, fail
from featureatlas.flows.cli_common import open_catalog_from_settings as _catalog
from featureatlas.schemas.catalog import ROWS

catalog_app = typer.Typer(help="Browse the metadata catalog.", no_args_is_help=True)
KINDS = list(ROWS)


def _row_dict(kind: str, row) -> dict:
    return {
        "id": row.id,
        "kind": kind,
        "path": row.uri,
        "fingerprint": row.fingerprint,
        "mlflow_run_id": row.mlflow_run_id,
        "created_at": row.created_at.isoformat(),
        "config": row.config,
    }


def _num(value, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


@catalog_app.command("list")
def catalog_list(
    kind: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--kind", metavar="KIND", help=f"Only this kind: {', '.join(KINDS)}."),
    ] = None,
    method: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--method", metavar="METHOD", help="Only artifacts of dictionaries of this method."),
    ] = None,
    hookpoint: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            "--hookpoint", metavar="HOOKPOINT", help="Only artifacts of dictionaries at this hookpoint."
        ),
    ] = None,
    where: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            "--where", metavar="SQL", help='A condition over the columns, e.g. "fvu < 0.2 AND k = 32".'
        ),
    ] = None,
    sort: Annotated[
        str,
        typer.Option("--sort", metavar="COLUMN", help="Column to sort by, e.g. fvu, l0, created_at."),
    ] = "created_at",
    descending: Annotated[bool, typer.Option("--desc", help="Sort in descending order.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """List registered artifacts with method, hookpoint, d_sae, k, L0, FVU, CE-loss score and status."""
    from featureatlas.tasks.tracking.catalog_view import list_artifacts

    if kind is not None and kind not in KINDS:
        raise typer.BadParameter(
            f"unknown kind {kind!r}; choose one of {', '.join(KINDS)}", param_hint="--kind"
        )
    cat = _catalog()
    try:
        frame = list_artifacts(
            cat, kind, where, method=method, hookpoint=hookpoint, sort=sort, descending=descending
        )
    except ValueError as e:
        raise fail(str(e), 2) from None
    if as_json:  # the frame's columns, and the config each artifact was made with
        configs = {r.id: r.config for _, r in cat.list(kind)}
        out = [
            row | {"created_at": row["created_at"].isoformat(), "config": configs.get(row["id"])}
            for row in frame.iter_rows(named=True)
        ]
        print(json.dumps(out, indent=1))
        return
    table = Table(title=f"catalog: {frame.height} artifacts")
    for col in (
        "id",
        "kind",
        "method",
        "hookpoint",
        "d_sae",
        "k",
        "L0",
        "FVU",
        "CE score",
        "status",
        "created",
    ):
        table.add_column(col, justify="right" if col in ("d_sae", "k", "L0", "FVU", "CE score") else "left")
    for r in frame.iter_rows(named=True):
        table.add_row(
            r["id"],
            r["kind"],
            r["method"] or "",
            escape(r["hookpoint"] or ""),
            _num(r["d_sae"], "d"),
            _num(r["k"], "d"),
            _num(r["l0"], ".1f"),
            _num(r["fvu"], ".3f"),
            _num(r["ce_loss_score"], ".3f"),
            "[red]missing[/red]" if r["status"] == "missing" else r["status"],
            r["created_at"].strftime("%Y-%m-%d %H:%M"),
        )
    console.print(table)


def _get(artifact_id: str):
    found = _catalog().get(artifact_id)
    if found is None:
        raise fail(f"no artifact {artifact_id!r} in the catalog; `featureatlas catalog list` shows the ids")
    return found


@catalog_app.command("show")
def catalog_show(
    artifact_id: Annotated[str, typer.Argument(metavar="ID", help="Artifact id, e.g. dict-0123abcd4567.")],
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """One artifact: where it lives, its config, its metrics, its MLflow run, its parents and children."""
    kind, row = _get(artifact_id)
    cat = _catalog()
    parents, children = cat.parents(row.id), cat.children(row.id)
    if as_json:
        print(
            json.dumps(
                _row_dict(kind, row) | {"parents": parents, "children": children, "ref": row.ref}, indent=1
            )
        )
        return
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold")
    facts.add_column()
    for name, value in (
        ("id", row.id),
        ("kind", kind),
        ("path", row.uri + ("" if Path(row.uri).exists() else "  [red](missing)[/red]")),
        ("created", row.created_at.strftime("%Y-%m-%d %H:%M:%S")),
        ("fingerprint", row.fingerprint),
        ("MLflow run", row.mlflow_run_id or ""),
        ("derived from", ", ".join(parents) or "-"),
        ("used by", ", ".join(children) or "-"),
    ):
        facts.add_row(name, escape(str(value)) if name != "path" else value)
    console.print(facts)
    console.print("[bold]config[/bold]")
    console.print(_flat_table(row.config))
    metrics = getattr(row, "metrics", None)
    if metrics:
        console.print("[bold]metrics[/bold]")
        console.print(_flat_table(metrics))


def _flat(value, prefix: str = "") -> list[tuple[str, str]]:
    """Nested dicts as dotted keys; lists and scalars as their JSON text."""
    if isinstance(value, dict):
        return [kv for k, v in value.items() for kv in _flat(v, f"{prefix}{k}.")]
    text = json.dumps(value) if not isinstance(value, str) else value
    return [(prefix.rstrip("."), text if len(text) <= 120 else text[:117] + "...")]


def _flat_table(value: dict) -> Table:
    table = Table.grid(padding=(0, 2))
    table.add_column(style="cyan")
    table.add_column()
    for k, v in _flat(value):
        table.add_row(escape(k), escape(v))
    return table


@catalog_app.command("lineage")
def catalog_lineage(
    artifact_id: Annotated[str, typer.Argument(metavar="ID", help="Artifact id.")],
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Ancestors and descendants of an artifact, as trees."""
    _get(artifact_id)
    cat = _catalog()

    def walk(node: str, step) -> dict:
        return {n: walk(n, step) for n in step(node)}

    ancestors, descendants = walk(artifact_id, cat.parents), walk(artifact_id, cat.children)
    if as_json:
        paths = {k: r.uri for k, r in ((r.id, r) for _, r in cat.list())}
        print(
            json.dumps(
                {"id": artifact_id, "ancestors": ancestors, "descendants": descendants, "paths": paths},
                indent=1,
            )
        )
        return

    def grow(tree: Tree, children: dict) -> Tree:
        for name, sub in children.items():
            grow(tree.add(name), sub)
        return tree

    console.print(grow(Tree(f"[bold]{artifact_id}[/bold] derived from"), ancestors))
    console.print(grow(Tree(f"[bold]{artifact_id}[/bold] used by"), descendants))


@catalog_app.command("remove")
def catalog_remove(
    artifact_id: Annotated[str, typer.Argument(metavar="ID", help="Artifact id, e.g. cache-0123abcd4567.")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only list what would be removed.")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Remove an artifact and everything derived from it: catalog rows, lineage edges and folders."""
    from featureatlas.tasks.tracking.catalog_removal import removal_plan, remove

    cat = _catalog()
    try:
        plan = removal_plan(cat, artifact_id)
    except ValueError as e:
        raise fail(str(e)) from None
    verb = "would remove" if dry_run else "removing"
    console.print(f"{verb} {len(plan.ids)} artifact(s) and {plan.edges} lineage edge(s):", markup=False)
    for i in plan.ids:
        console.print(f"  {plan.kinds[i]:<16} {i}  {plan.paths[i]}", markup=False)
    if dry_run:
        return
    if not yes and not typer.confirm("remove them?", default=False):
        raise typer.Exit(1)
    removed = remove(cat, plan)
    console.print(f"removed {len(plan.ids)} catalog row(s) and {len(removed)} folder(s)", markup=False)
