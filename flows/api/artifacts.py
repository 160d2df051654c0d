"""Open what a pipeline made, by catalog id or by folder: dictionaries, caches, feature tables, evaluations.

Every function takes an id from the catalog (`dict-...`, `cache-...`, `eval-...`, `labels-...`) and, where a
folder is enough, a path instead. A dictionary id leads to what was made from it: `features("dict-...")` is
the table of its newest labeling, `evaluation("dict-...")` its newest evaluation, `load_cache("dict-...")`
the cache it was trained on.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from featureatlas.catalog_view import catalog

if TYPE_CHECKING:
    import polars as pl
    import torch

    from featureatlas.schemas.artifacts import EvalReport
    from featureatlas.tasks.common.store import ActivationCache
    from featureatlas.tasks.dictionary.base import Dictionary

__all__ = ["atlas", "compare", "evaluation", "features", "load_cache", "load_dictionary", "search_features"]


def _folder(id_or_path: str | Path, kind: str, home: str | Path | None) -> Path:
    """The folder of the `kind` artifact an id names or leads to; an existing folder is taken as it is."""
    if isinstance(id_or_path, Path) or Path(id_or_path).exists():
        return Path(id_or_path)
    return Path(catalog(home).resolve(str(id_or_path), kind).path)


def load_dictionary(
    id_or_path: str | Path, device: str | torch.device = "cpu", home: str | Path | None = None
) -> Dictionary:
    """A trained dictionary with `encode`, `decode` and `decoder_directions`, whatever its method.

    `id_or_path`: a dictionary id (or an evaluation/labeling id, which leads to its dictionary), or a folder
    holding cfg.json and weights.safetensors.
    """
    from featureatlas.tasks.dictionary import load_dictionary as load

    return load(_folder(id_or_path, "dictionary", home), device=device)


def load_cache(
    id_or_path: str | Path, verify: bool = True, home: str | Path | None = None
) -> ActivationCache:
    """An activation cache, read-only: `.load(hookpoint, rows)`, `.stream(hookpoint, batch_size=...)`,
    `.tokens` (the token table as a Polars frame), `.select_rows("heldout")`.

    `id_or_path`: a cache id, a dictionary id (its training cache), or a cache folder. `verify` checks every
    shard's checksum on open.
    """
    from featureatlas.tasks.common.store import ActivationCache

    return ActivationCache(_folder(id_or_path, "activation_cache", home), verify=verify)


def features(id_or_path: str | Path, home: str | Path | None = None) -> pl.DataFrame:
    """The labeling table: one row per latent with its label, frequency, activation statistics, top
    contexts (`contexts`: list of {text, activation, ...}), quantile examples and neighbours.

    `id_or_path`: a labeling id, a dictionary id (its newest labeling), or a labeling folder.
    """
    import polars as pl

    return pl.read_parquet(_folder(id_or_path, "labeling", home) / "features.parquet")


def evaluation(artifact_id: str, home: str | Path | None = None) -> EvalReport:
    """The evaluation report (FVU, L0, dead fraction, CE-loss scores and the detailed figures in
    `.details`) of an evaluation id, or the newest evaluation of a dictionary id."""
    return catalog(home).resolve(artifact_id, "evaluation")


def compare(home: str | Path | None = None) -> pl.DataFrame:
    """One row per evaluated dictionary (the table of `featureatlas compare`), sorted by method, hookpoint
    and L0: the sparsity-fidelity frontier as data."""
    import polars as pl

    from featureatlas.tasks.evaluate.compare import ComparisonRow, comparison_rows

    rows = comparison_rows(catalog(home).sql)
    return pl.DataFrame([r.model_dump() for r in rows], schema=list(ComparisonRow.model_fields))


def search_features(text: str, limit: int = 50, home: str | Path | None = None) -> pl.DataFrame:
    """Features of every labeled dictionary whose label contains `text` (any case), best detection score
    first (the table of `featureatlas features search`)."""
    import polars as pl

    from featureatlas.tasks.labeling.lookup import search_labels

    schema = {
        "dictionary_id": pl.String,
        "labeling_id": pl.String,
        "latent": pl.Int64,
        "label": pl.String,
        "frequency": pl.Float64,
        "detection_score": pl.Float64,
        "label_source": pl.String,
        "page": pl.String,
    }
    return pl.DataFrame(search_labels(catalog(home).sql, text, limit), schema=schema)


def atlas(artifact_id: str, latent: int | None = None, home: str | Path | None = None) -> Path:
    """The HTML atlas of a dictionary's (or labeling's) newest labeling: its index page, or one latent's."""
    from featureatlas.tasks.labeling.lookup import find_atlas

    index = find_atlas(catalog(home).sql, artifact_id)
    if latent is None:
        return index
    page = index.parent / "features" / f"{latent}.html"
    if not page.is_file():
        raise ValueError(
            f"latent {latent} has no page in {index.parent} (it never fired, or is out of range)"
        )
    return page
