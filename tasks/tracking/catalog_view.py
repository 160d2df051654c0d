"""The catalog as one table to compare runs by; removing an artifact with everything derived from it.

`catalog_frame` gives one row per artifact with what tells dictionaries apart (method, hookpoint, d_sae, k)
and their headline evaluation (L0, FVU, CE-loss score), filled in for dictionaries, evaluations and labelings
alike, and a status: `trained`, `evaluated`, `labeled` for dictionaries, `ok` for the rest, `missing` when
the artifact's folder is gone. Filters and sorting are Polars expressions, so the CLI and any notebook share
them (`filter_frame`). `removal_plan` walks the lineage edges down from an artifact (its descendants cannot
exist without it); `remove` deletes their rows and edges in one transaction, children first, then folders.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import NamedTuple

import polars as pl
from sqlalchemy import delete, or_
from sqlalchemy.orm import Session

from featureatlas.schemas.catalog import ROWS, LineageEdge

COLUMNS = {
    "id": pl.String,
    "kind": pl.String,
    "method": pl.String,
    "hookpoint": pl.String,
    "d_sae": pl.Int64,
    "k": pl.Int64,
    "l0": pl.Float64,
    "fvu": pl.Float64,
    "ce_loss_score": pl.Float64,
    "status": pl.String,
    "created": pl.Datetime(time_zone="UTC"),
    "path": pl.String,
    "mlflow_run_id": pl.String,
}
# children before parents: the order rows must be deleted in (foreign keys point up the lineage)
_DELETE_ORDER = (
    "interactions",
    "labeling",
    "evaluation",
    "dictionary",
    "activation_cache",
    "corpus",
    "model",
)


def catalog_frame(catalog) -> pl.DataFrame:
    """Every artifact of `catalog` (a `Catalog`) with its dictionary's facts and headline metrics."""
    listed = catalog.list()
    dictionaries = {r.id: r for k, r in listed if k == "dictionary"}
    evaluations: dict[str, dict] = {}
    labeled: set[str] = set()
    for kind, r in listed:
        if kind == "evaluation":
            evaluations[r.dictionary_id] = r.metrics or {}
        elif kind == "labeling":
            labeled.add(r.dictionary_id)
    rows = []
    for kind, r in listed:
        exists = Path(r.uri).exists()
        dict_id = r.id if kind == "dictionary" else getattr(r, "dictionary_id", None)
        d = dictionaries.get(dict_id) if dict_id else None
        metrics = (r.metrics or {}) if kind == "evaluation" else evaluations.get(dict_id, {})
        if not exists:
            status = "missing"
        elif kind == "dictionary":
            status = "labeled" if r.id in labeled else ("evaluated" if r.id in evaluations else "trained")
        else:
            status = "ok"
        rows.append(
            {
                "id": r.id,
                "kind": kind,
                "method": d.method if d else None,
                "hookpoint": d.hookpoint if d else None,
                "d_sae": d.d_sae if d else None,
                "k": (d.config or {}).get("k") if d else None,
                "l0": metrics.get("l0"),
                "fvu": metrics.get("fvu"),
                "ce_loss_score": metrics.get("ce_loss_score"),
                "status": status,
                "created": r.created_at,
                "path": r.uri,
                "mlflow_run_id": r.mlflow_run_id,
            }
        )
    return pl.DataFrame(rows, schema=COLUMNS, orient="row")


def filter_frame(
    frame: pl.DataFrame,
    *,
    kind: str | None = None,
    method: str | None = None,
    hookpoint: str | None = None,
    where: str | None = None,
    sort: str | None = None,
    descending: bool = False,
) -> pl.DataFrame:
    """Rows matching every filter given; `where` is a SQL condition over the columns (`fvu < 0.2`)."""
    for column, value in (("kind", kind), ("method", method), ("hookpoint", hookpoint)):
        if value is not None:
            frame = frame.filter(pl.col(column) == value)
    if where:
        try:
            frame = frame.filter(pl.sql_expr(where))
        except (pl.exceptions.PolarsError, ValueError) as e:
            first = str(e).strip().splitlines()[0]
            raise ValueError(
                f"--where {where!r} is not a condition over the columns {', '.join(COLUMNS)} ({first}); "
                'e.g. "fvu < 0.2 AND d_sae >= 4096"'
            ) from None
    if sort:
        if sort not in COLUMNS:
            raise ValueError(f"cannot sort by {sort!r}; columns: {', '.join(COLUMNS)}")
        frame = frame.sort(sort, descending=descending, nulls_last=True)
    return frame


class Removal(NamedTuple):
    ids: list[str]  # the artifact and its descendants, children first
    kinds: dict[str, str]
    paths: dict[str, str]
    edges: int  # lineage edges that touch them


def removal_plan(catalog, artifact_id: str) -> Removal:
    """What `remove` would delete: the artifact, everything derived from it, their edges and folders."""
    found = catalog.get(artifact_id)
    if found is None:
        raise ValueError(
            f"no artifact {artifact_id!r} in the catalog; `featureatlas catalog list` shows the ids"
        )
    seen, todo = {artifact_id}, [artifact_id]
    while todo:
        for child in catalog.children(todo.pop()):
            if child not in seen:
                seen.add(child)
                todo.append(child)
    kinds, paths = {}, {}
    for kind, r in catalog.list():
        if r.id in seen:
            kinds[r.id], paths[r.id] = kind, r.uri
    ids = sorted(seen, key=lambda i: (_DELETE_ORDER.index(kinds[i]), i))
    edges = sum(1 for child, parent in catalog.edges() if child in seen or parent in seen)
    return Removal(ids, kinds, paths, edges)


def remove(catalog, plan: Removal) -> list[str]:
    """Delete the plan's rows and edges in one transaction, then their folders (returned)."""
    with Session(catalog.engine) as s, s.begin():
        s.execute(
            delete(LineageEdge).where(
                or_(LineageEdge.child_id.in_(plan.ids), LineageEdge.parent_id.in_(plan.ids))
            )
        )
        for artifact_id in plan.ids:
            row_cls = ROWS[plan.kinds[artifact_id]]
            s.execute(delete(row_cls).where(row_cls.id == artifact_id))
    removed = []
    for artifact_id in plan.ids:
        folder = Path(plan.paths[artifact_id])
        if folder.is_dir():
            shutil.rmtree(folder)
            removed.append(str(folder))
    return removed
