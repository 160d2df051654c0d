"""`featureatlas run --plan`: the DAG a spec builds, each stage's fingerprint, whether it would be reused, and
the memory it needs.

Uses the same identity formulas as the stages, so the plan and the run agree. Before any fingerprint, the
plan checks what would otherwise fail late (`tasks/common/preflight.py`: local paths, the held-out budget,
the model's config and hookpoints) and each stage's memory against its device (`tasks/common/memory.py`);
`pipeline_flow` runs the same checks before its first stage.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from featureatlas.schemas.settings import Settings
from featureatlas.schemas.spec import PipelineSpec
from featureatlas.tasks.activations.task import model_ident
from featureatlas.tasks.common.memory import StageMemory, check_fits, estimate
from featureatlas.tasks.common.preflight import check_paths, model_facts
from featureatlas.tasks.dictionary.task import sweep_groups
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
from featureatlas.tasks.tracking.members import member_label


class PlannedStage(NamedTuple):
    stage: str
    ident: Identity
    parents: list[str]
    reuse: bool
    path: str | None
    memory: int | None = None  # estimated peak bytes on the stage's device
    device: str | None = None


def _memory_by_key(estimates: list[StageMemory]) -> dict[tuple, StageMemory]:
    """Estimates by (stage, hookpoint, cfg); a training estimate covers every config of its group."""
    out = {}
    for e in estimates:
        if e.key[0] == "train":
            out |= {("train", e.key[1], c): e for c in e.key[2]}
        else:
            out[e.key] = e
    return out


def preflight(spec: PipelineSpec, settings: Settings, *, planning: bool = False) -> list[StageMemory]:
    """Refuse (PreflightError, a ValueError) what cannot run here: missing paths, no held-out tokens, an
    unreadable model config, unknown hookpoints, a stage that does not fit its device's free memory.

    `planning`: a stage on a device this machine lacks is shown with its estimate, not refused, so a GPU
    spec can be planned anywhere; running it here is refused."""
    check_paths(spec)  # before the model is fingerprinted: a missing folder says so, not "hub is off"
    if spec.model is None:
        return []
    source, model = model_ident(spec.model, settings.online)
    if not Path(source).exists():  # a hub id (online only): its config would have to be downloaded
        return []
    model_spec = spec.model
    # a registered GGUF model has a plain copy with config.json: reading that is instant, a GGUF header is not
    found = open_catalog(settings.catalog).find("model", model.fingerprint)
    if found is not None and found.get("converted") and Path(found["path"]).is_dir():
        source, model_spec = found["path"], model_spec.model_copy(update={"gguf_file": None})
    facts = model_facts(model_spec, source, spec.hookpoints)
    estimates = estimate(spec, facts, sweep_groups(spec.dictionary_jobs()))
    check_fits(estimates, skip_absent=planning)
    return estimates


def plan_pipeline(spec: PipelineSpec, settings: Settings) -> list[PlannedStage]:
    memory = _memory_by_key(preflight(spec, settings, planning=True))
    catalog = open_catalog(settings.catalog)

    def planned(stage: str, ident: Identity, parents: list[Identity], key: tuple = ()) -> PlannedStage:
        found = catalog.find(ident.kind, ident.fingerprint)
        reuse = found is not None and Path(found["path"]).exists()
        mem = memory.get(key)
        return PlannedStage(
            stage,
            ident,
            [p.id for p in parents],
            reuse,
            found["path"] if reuse else None,
            mem.bytes if mem else None,
            mem.device if mem else None,
        )

    stages, dictionaries, cache = [], [], None
    if spec.model is not None:
        _, model = model_ident(spec.model, settings.online)
        corpus = corpus_identity(spec.corpus)
        cache = cache_identity(model, corpus, spec.hookpoints, spec.cache)
        stages = [
            planned("register_model", model, [], ("register_model",)),
            planned("prepare_corpus", corpus, []),
            planned("cache_activations", cache, [model, corpus], ("cache_activations",)),
        ]
    for hookpoint, cfg in spec.dictionary_jobs():
        d = dictionary_identity(cache, hookpoint, cfg)
        dictionaries.append(d)
        what = member_label(hookpoint, [cfg])
        stages.append(planned(f"train_dictionary[{what}]", d, [cache], ("train", hookpoint, cfg)))
        if spec.evaluate.enabled:
            ident = evaluation_identity(d, cache, spec.evaluate)
            key = ("evaluate", hookpoint, cfg)
            stages.append(planned(f"evaluate_dictionary[{what}]", ident, [d, cache], key))
        if spec.label.enabled:
            ident = labeling_identity(d, cache, spec.label)
            stages.append(planned(f"label_features[{what}]", ident, [d, cache], ("label", hookpoint, cfg)))
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
