"""The catalog as one table to compare runs by: a Polars frame, its filters and its sorting.

`catalog_frame` gives one row per registered artifact with what tells dictionaries apart (method, hookpoint,
d_in, d_sae, k) and the headline figures of the newest evaluation (FVU, L0, CE-loss score, dead fraction),
filled in for dictionaries, evaluations and labelings alike, and a status: `trained`,
`evaluated`, `labeled` for dictionaries, `ok` for the rest, `missing` when the artifact's folder is gone.
`list_artifacts` adds the filters and the sorting. The Python API (`featureatlas.catalog().list()`) returns
this frame and `featureatlas catalog list` only formats it, so a notebook and the terminal show the same rows.

Polars and the SQL row classes are imported inside the functions: `import featureatlas` re-exports `COLUMNS`
and must stay cheap.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import polars as pl

    from featureatlas.tasks.tracking.catalog import Catalog

__all__ = ["COLUMNS", "catalog_frame", "filter_frame", "list_artifacts"]

# column -> Polars dtype name; the frame always has these columns, in this order, even when empty
COLUMNS: dict[str, str] = {
    "id": "String",
    "kind": "String",
    "created_at": "Datetime",
    "method": "String",
    "hookpoint": "String",
    "d_in": "Int64",
    "d_sae": "Int64",
    "k": "Int64",
    "fvu": "Float64",
    "l0": "Float64",
    "ce_loss_score": "Float64",
    "dead_fraction": "Float64",
    "status": "String",
    "n_tokens": "Int64",
    "dictionary_id": "String",
    "evaluation_id": "String",
    "cache_id": "String",
    "path": "String",
    "mlflow_run_id": "String",
    "fingerprint": "String",
}
_METRICS = ("fvu", "l0", "ce_loss_score", "dead_fraction")
_WHERE_EXAMPLE = '"fvu < 0.2 AND d_sae >= 4096"'


def _schema() -> dict[str, Any]:
    import polars as pl

    schema = {c: getattr(pl, t) for c, t in COLUMNS.items()}
    schema["created_at"] = pl.Datetime("us", "UTC")
    return schema


def _dictionary_facts(ref: dict) -> dict[str, Any]:
    cfg = ref.get("config") or {}
    return {
        "method": cfg.get("method"),
        "hookpoint": ref.get("hookpoint"),
        "d_in": ref.get("d_in"),
        "d_sae": ref.get("d_sae"),
        "k": cfg.get("k"),
        "cache_id": ref.get("cache_id"),
    }


def _status(kind: str, artifact_id: str, uri: str, evaluated: dict, labeled: set[str]) -> str:
    if not Path(uri).exists():
        return "missing"
    if kind != "dictionary":
        return "ok"
    if artifact_id in labeled:
        return "labeled"
    return "evaluated" if artifact_id in evaluated else "trained"


def catalog_frame(catalog: Catalog, kind: str | None = None) -> pl.DataFrame:
    """One row per registered artifact (of `kind`, or all), oldest first, with the columns of COLUMNS.

    A dictionary or labeling row carries the dictionary's method, hookpoint, d_sae, k and the figures of
    its newest evaluation (null when it was never evaluated), so `fvu < 0.2` finds the labelings of good
    dictionaries too; an evaluation row carries its dictionary's facts and its own figures.
    """
    import polars as pl

    rows = catalog.list()  # per kind, oldest first: the newest evaluation of a dictionary is seen last
    refs = {r.id: r.ref for _, r in rows}
    newest_eval: dict[str, Any] = {}
    labeled: set[str] = set()
    for k, r in rows:
        if k == "evaluation":
            newest_eval[r.ref["dictionary_id"]] = r
        elif k == "labeling":
            labeled.add(r.ref["dictionary_id"])
    records = []
    for k, r in rows:
        if kind not in (None, k):
            continue
        rec: dict[str, Any] = {
            "id": r.id,
            "kind": k,
            "created_at": r.created_at,
            "status": _status(k, r.id, r.uri, newest_eval, labeled),
            "n_tokens": r.ref.get("n_tokens"),
            "path": r.uri,
            "mlflow_run_id": r.mlflow_run_id,
            "fingerprint": r.fingerprint,
        }
        dictionary_id = r.id if k == "dictionary" else r.ref.get("dictionary_id")
        if dictionary_id in refs:  # a dictionary, or an evaluation or labeling of one
            rec |= _dictionary_facts(refs[dictionary_id]) | {"dictionary_id": dictionary_id}
            ev = r if k == "evaluation" else newest_eval.get(dictionary_id)
            if ev is not None:
                rec |= {m: ev.ref.get(m) for m in _METRICS} | {"evaluation_id": ev.id}
        elif k == "activation_cache":
            rec["cache_id"] = r.id
        records.append(rec)
    frame = pl.DataFrame(records, schema=_schema())
    return frame.sort("created_at", maintain_order=True)


def filter_frame(
    frame: pl.DataFrame,
    *,
    kind: str | None = None,
    method: str | None = None,
    hookpoint: str | None = None,
    where: str | pl.Expr | None = None,
    sort: str | None = None,
    descending: bool = False,
) -> pl.DataFrame:
    """Rows matching every filter given, sorted by `sort` (nulls last).

    `where` is a Polars expression or a SQL condition over the columns, e.g. `"fvu < 0.2 AND k >= 8"`.
    """
    import polars as pl

    for column, value in (("kind", kind), ("method", method), ("hookpoint", hookpoint)):
        if value is not None:
            frame = frame.filter(pl.col(column) == value)
    if where is not None:
        try:
            frame = frame.filter(pl.sql_expr(where) if isinstance(where, str) else where)
        except (pl.exceptions.PolarsError, ValueError) as e:  # SQL syntax, unknown column, wrong type
            first = str(e).strip().splitlines()[0]
            raise ValueError(
                f"where {where!r} is not a condition over the columns ({type(e).__name__}: {first}); "
                f"columns: {', '.join(COLUMNS)}; e.g. {_WHERE_EXAMPLE}"
            ) from None
    if sort is not None:
        if sort not in COLUMNS:
            raise ValueError(f"cannot sort by {sort!r}; columns: {', '.join(COLUMNS)}")
        frame = frame.sort(sort, descending=descending, nulls_last=True, maintain_order=True)
    return frame


def list_artifacts(
    catalog: Catalog,
    kind: str | None = None,
    where: str | pl.Expr | None = None,
    *,
    method: str | None = None,
    hookpoint: str | None = None,
    sort: str | None = None,
    descending: bool = False,
) -> pl.DataFrame:
    """`catalog_frame` with `filter_frame`'s filters and sorting; an unknown `kind` names the known ones."""
    from featureatlas.schemas.catalog import ROWS

    if kind is not None and kind not in ROWS:
        raise ValueError(f"unknown kind {kind!r}; choose one of {', '.join(ROWS)}")
    return filter_frame(
        catalog_frame(catalog),
        kind=kind,
        method=method,
        hookpoint=hookpoint,
        where=where,
        sort=sort,
        descending=descending,
    )
