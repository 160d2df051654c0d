"""`featureatlas run --plan`: the DAG a spec builds, each stage's fingerprint, and whether it would be reused.

Uses the same identity formulas as the stages, so the plan and the run agree.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from schemas.settings import Settings
from schemas.spec import PipelineSpec
from tasks.activations.task import model_ident
from tasks.tracking.catalog import open_catalog
from tasks.tracking.identity import (
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
        stages.append(planned(f"train_dictionary[{cfg.method}, {hookpoint}]", d, [cache]))
        if spec.evaluate.enabled:
            stages.append(
                planned("evaluate_dictionary", evaluation_identity(d, cache, spec.evaluate), [d, cache])
            )
        if spec.label.enabled:
            stages.append(planned("label_features", labeling_identity(d, cache, spec.label), [d, cache]))
    if spec.interactions.enabled:
        stages.append(planned("score_interactions", interactions_identity(spec.interactions), []))
    return stages
