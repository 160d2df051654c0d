"""`featureatlas catalog ...`: list, show and trace the lineage of registered artifacts."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer
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


@catalog_app.command("list")
def catalog_list(
    kind: Annotated[Optional[str], typer.Option("--kind", help=f"One of: {', '.join(KINDS)}.")] = None,  # noqa: UP045
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """List registered artifacts."""
    if kind is not None and kind not in KINDS:
        raise typer.BadParameter(
            f"unknown kind {kind!r}; choose one of {', '.join(KINDS)}", param_hint="--kind"
        )
    rows = _catalog().list(kind)
    if as_json:
        print(json.dumps([_row_dict(k, r) for k, r in rows], indent=1))
        return
    table = Table(title="catalog")
    for col in ("id", "kind", "created", "path"):
        table.add_column(col)
    for k, r in rows:
        table.add_row(r.id, k, r.created_at.strftime("%Y-%m-%d %H:%M"), r.uri)
    console.print(table)


def _get(artifact_id: str):
    found = _catalog().get(artifact_id)
    if found is None:
        raise fail(f"no artifact {artifact_id!r} in the catalog; `featureatlas catalog list` shows the ids")
    return found


@catalog_app.command("show")
def catalog_show(
    artifact_id: Annotated[str, typer.Argument(help="Artifact id, e.g. dict-0123abcd4567.")],
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Show one artifact: where it lives, its config, its MLflow run, its parents and children."""
    kind, row = _get(artifact_id)
    cat = _catalog()
    info = _row_dict(kind, row) | {
        "parents": cat.parents(row.id),
        "children": cat.children(row.id),
        "ref": row.ref,
    }
    if as_json:
        print(json.dumps(info, indent=1))
        return
    console.print_json(json.dumps(info))


@catalog_app.command("lineage")
def catalog_lineage(
    artifact_id: Annotated[str, typer.Argument(help="Artifact id.")],
    as_json: Annotated[bool, typer.Option("--json")] = False,
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
