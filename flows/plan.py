"""`featureatlas run --plan`: the DAG a spec builds, each stage's fingerprint, and whether it would be reused.

Uses the same identity formulas as the stages, so the plan and the run agree.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from featureatlas.schemas.settings import Settings
from featureatlas.schemas.spec import PipelineSpec
from featureatlas.tasks.activations.task import model_ident
from featureatlas.tasks.tracking.catalog import open_catalog
from featureatlas.tasks.tracking.identity import (
    Identity,
    cache_identity,
    corpus_identity,
    dictionary_identity,
    evaluation_identity,
    interactions_identity,
    labeling_identity,
)


class PlannedStage(NamedTuple):
    stage: str
    ident: Identity
    parents: list[str]
    reuse: bool
    path: str | None


def plan_pipeline(spec: PipelineSpec, settings: Settings) -> list[PlannedStage]:
    catalog = open_catalog(settings.catalog)

    def planned(stage: str, ident: Identity, parents: list[Identity]) -> PlannedStage:
        found = catalog.find(ident.kind, ident.fingerprint)
        reuse = found is not None and Path(found["path"]).exists()
        return PlannedStage(stage, ident, [p.id for p in parents], reuse, found["path"] if reuse else None)

    stages, dictionaries, cache = [], [], None
    if spec.model is not None:
        _, model = model_ident(spec.model, settings.online)
        corpus = corpus_identity(spec.corpus)
        cache = cache_identity(model, corpus, spec.hookpoints, spec.cache)
        stages = [
            planned("register_model", model, []),
            planned("prepare_corpus", corpus, []),
            planned("cache_activations", cache, [model, corpus]),
        ]
    for hookpoint, cfg in spec.dictionary_jobs():
        d = dictionary_identity(cache, hookpoint, cfg)
        dictionaries.append(d)
        stages.append(planned(f"train_dictionary[{cfg.method}, {hookpoint}]", d, [cache]))
        if spec.evaluate.enabled:
            stages.append(
                planned("evaluate_dictionary", evaluation_identity(d, cache, spec.evaluate), [d, cache])
            )
        if spec.label.enabled:
            stages.append(planned("label_features", labeling_identity(d, cache, spec.label), [d, cache]))
    if spec.interactions.enabled:
        inputs = interaction_inputs(spec, catalog, cache, dictionaries)
        stages.append(planned("score_interactions", interactions_identity(spec.interactions, inputs), inputs))
    return stages


def interaction_inputs(
    spec: PipelineSpec, catalog, cache: Identity | None, dictionaries: list[Identity]
) -> list[Identity]:
    """The dictionary and cache a probe reads (the same resolution as the stage's), none for a table."""
    inter = spec.interactions
    if inter.source != "dictionary":
        return []
    if not isinstance(inter.dictionary, str):
        return [dictionaries[inter.dictionary or 0], cache]
    made_here = [d for d in dictionaries if d.id == inter.dictionary]
    if made_here:
        return [made_here[0], cache]
    found = catalog.get(inter.dictionary)
    if found is None or found[0] != "dictionary":
        raise ValueError(f"interactions.dictionary {inter.dictionary!r} is not a dictionary in the catalog")
    row = found[1]
    cache_row = catalog.get(row.cache_id)
    if cache_row is None:
        raise ValueError(f"the activation cache {row.cache_id} of {row.id} is not in the catalog")
    return [
        Identity("dictionary", row.id, row.fingerprint),
        Identity("activation_cache", cache_row[1].id, cache_row[1].fingerprint),
    ]
