"""Finding labeled features through the catalog: a dictionary's atlas, and labels matching a text.

Used by `featureatlas dashboard ID` and `featureatlas features search TEXT`. Reads each labeling's
`features.parquet` lazily (only the label columns), so a search over many dictionaries stays cheap.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from featureatlas.tasks.tracking.catalog import Catalog

__all__ = ["find_atlas", "search_labels"]


def _labelings(catalog: Catalog) -> list:
    return [row for _, row in catalog.list("labeling")]


def find_atlas(catalog: Catalog, artifact_id: str) -> Path:
    """index.html of the newest atlas for a dictionary id or a labeling id; ValueError names the fix."""
    rows = [r for r in _labelings(catalog) if artifact_id in (r.id, r.dictionary_id)]
    if not rows:
        raise ValueError(
            f"no labeling of {artifact_id!r} in the catalog; give a dictionary or labeling id from "
            "`featureatlas catalog list --kind labeling`"
        )
    row = max(rows, key=lambda r: r.created_at)
    index = Path(row.uri) / "atlas" / "index.html"
    if not index.is_file():
        raise ValueError(
            f"labeling {row.id} has no atlas at {index}; run the pipeline with `label.atlas: true`"
        )
    return index


def search_labels(catalog: Catalog, text: str, limit: int = 50) -> list[dict]:
    """Features whose label (statistical, else top token; or an LLM label) contains `text` (any case), best
    scores first; each hit names its `label_source`."""
    needle = text.lower()
    found = []
    for row in _labelings(catalog):
        path = Path(row.uri) / "features.parquet"
        if not path.is_file():
            continue
        lf = pl.scan_parquet(path)
        names = lf.collect_schema().names()
        label = pl.col("stat_label") if "stat_label" in names else pl.col("label")
        score = pl.col("detection_score") if "detection_score" in names else pl.lit(None, pl.Float64)
        hits = (
            lf.select(
                pl.col("latent"),
                pl.coalesce(label, pl.col("label")).alias("label"),
                pl.col("frequency"),
                score.alias("detection_score"),
            )
            .filter(pl.col("label").str.to_lowercase().str.contains(needle, literal=True))
            .with_columns(pl.lit("stat").alias("label_source"))
            .collect()
        )
        if "labels" in names:  # LLM labels (the statistical one is matched above)
            llm = (
                lf.select("latent", "frequency", "labels")
                .explode("labels")
                .unnest("labels")
                .filter(
                    (pl.col("label_source") != "stat")
                    & pl.col("label").str.to_lowercase().str.contains(needle, literal=True)
                )
                .select(hits.columns)
                .collect()
            )
            hits = pl.concat([hits, llm])
        for hit in hits.iter_rows(named=True):
            atlas = Path(row.uri) / "atlas" / "features" / f"{hit['latent']}.html"
            found.append(
                {
                    "dictionary_id": row.dictionary_id,
                    "labeling_id": row.id,
                    **hit,
                    "page": str(atlas) if atlas.is_file() else None,
                }
            )
    found.sort(key=lambda h: (-(h["detection_score"] or 0.0), -h["frequency"]))
    return found[:limit]
