"""Which atlases a dashboard shows: one dictionary's, or every labeled dictionary of a pipeline run.

`featureatlas dashboard [ID]` takes a dictionary or labeling id (that dictionary's newest labeling), the
MLflow run id of a pipeline run (its dictionaries, from the result the run left in
`<home>/specs/<run>.result.json`), or nothing (the newest pipeline run that labeled anything). The run
index across dictionaries is written next to those results (`<home>/atlas/<run>/index.html`) and links
into each dictionary's own atlas.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from featureatlas.schemas.artifacts import ActivationCacheRef, DictionaryRef, PipelineResult
from featureatlas.tasks.labeling.atlas_index import index_page, index_rows
from featureatlas.tasks.labeling.lookup import find_atlas
from featureatlas.tasks.tracking.catalog import Catalog
from featureatlas.tasks.tracking.lineage import dictionary_title

__all__ = ["AtlasEntry", "AtlasSet", "resolve_atlases", "run_index"]

# the feature-table columns the index reads (the rest, contexts above all, stays on disk)
_INDEX_COLUMNS = ("latent", "stat_label", "label", "labels", "promoted_tokens", "frequency")
_INDEX_COLUMNS += ("detection_score", "max_activation")


@dataclass(frozen=True)
class AtlasEntry:
    """One labeled dictionary: its atlas folder, and what the "try it" box needs to run it."""

    dictionary: DictionaryRef
    cache: ActivationCacheRef
    atlas: Path

    @property
    def title(self) -> str:
        return dictionary_title(self.dictionary)


@dataclass(frozen=True)
class AtlasSet:
    """The atlases one dashboard shows; `run_id` is set when they are the dictionaries of a pipeline run."""

    entries: list[AtlasEntry]
    run_id: str | None


def _entry(catalog: Catalog, dictionary_id: str) -> AtlasEntry:
    atlas = find_atlas(catalog, dictionary_id).parent
    found = catalog.get(dictionary_id)
    if found is None or found[0] != "dictionary":
        raise ValueError(
            f"{dictionary_id!r} is not a dictionary in the catalog; see `featureatlas catalog list`"
        )
    dictionary = DictionaryRef.model_validate(found[1].ref)
    cache_row = catalog.get(dictionary.cache_id)
    if cache_row is None:
        raise ValueError(f"the cache {dictionary.cache_id} of {dictionary_id} is not in the catalog any more")
    return AtlasEntry(dictionary, ActivationCacheRef.model_validate(cache_row[1].ref), atlas)


def _results(home: Path) -> list[Path]:
    files = (home / "specs").glob("*.result.json")
    return sorted(files, key=lambda p: p.stat().st_mtime, reverse=True)


def _from_result(catalog: Catalog, path: Path) -> AtlasSet:
    result = PipelineResult.model_validate(json.loads(path.read_text()))
    ids = [d.dictionary.id for d in result.dictionaries if d.labeling is not None and d.labeling.spec.atlas]
    return AtlasSet([_entry(catalog, i) for i in ids], result.mlflow_run_id)


def resolve_atlases(catalog: Catalog, home: Path, target: str | None) -> AtlasSet:
    """The atlases for `target` (see the module docstring); ValueError with the fix when there are none."""
    if target is None:
        for path in _results(home):
            found = _from_result(catalog, path)
            if found.entries:
                return found
        raise ValueError("no pipeline run has labeled a dictionary yet; run one with `label.atlas: true`")
    result = home / "specs" / f"{target}.result.json"
    if result.is_file():
        found = _from_result(catalog, result)
        if not found.entries:
            raise ValueError(f"pipeline run {target} made no atlas; run it with `label.atlas: true`")
        return found
    kind = catalog.get(target)
    if kind is not None and kind[0] == "labeling":
        target = kind[1].dictionary_id
    return AtlasSet([_entry(catalog, target)], None)


def run_index(atlases: AtlasSet, prefix_of) -> str:
    """The index page across `atlases`; `prefix_of(entry)` is the link prefix of that entry's atlas folder."""
    sections = []
    for e in atlases.entries:
        lf = pl.scan_parquet(e.atlas.parent / "features.parquet")
        names = set(lf.collect_schema().names())
        table = lf.select([c for c in _INDEX_COLUMNS if c in names]).collect()
        sections.append((e.title, index_rows(table, e.dictionary.id, prefix_of(e))))
    title = f"Feature atlas of pipeline run {atlases.run_id}" if atlases.run_id else "Feature atlas"
    return index_page(title, sections, run=len(sections) > 1)


def write_run_index(atlases: AtlasSet, home: Path) -> Path:
    """Write the static index across `atlases` to `<home>/atlas/<run>/index.html` (relative links)."""
    folder = home / "atlas" / str(atlases.run_id)
    folder.mkdir(parents=True, exist_ok=True)
    html_ = run_index(atlases, lambda e: Path(os.path.relpath(e.atlas, folder)).as_posix() + "/")
    index = folder / "index.html"
    tmp = index.with_suffix(".tmp")
    tmp.write_text(html_)
    os.replace(tmp, index)
    return index
