"""The pipeline flow: the stages in order, as the spec declares them. No maths and no I/O here."""

from __future__ import annotations

from prefect import flow

from schemas.artifacts import DictionaryResult, PipelineResult
from schemas.settings import Settings
from schemas.spec import PipelineSpec
from tasks.activations.task import cache_activations, prepare_corpus, register_model
from tasks.dictionary.task import sweep_groups, train_dictionaries_task
from tasks.evaluate.task import evaluate_dictionary
from tasks.interactions.task import score_interactions
from tasks.labeling.task import label_features
from tasks.tracking.pipeline_run import log_summary, pipeline_run


@flow(name="featureatlas-pipeline")
def pipeline_flow(spec: PipelineSpec, progress: bool = False) -> PipelineResult:
    settings = Settings()
    with pipeline_run(settings, spec, progress) as ctx:
        model = corpus = cache = None  # a spec may hold only an `interactions` section
        results = []
        if spec.model is not None:
            model = register_model(ctx, spec.model)
            corpus = prepare_corpus(ctx, spec.corpus)
            cache = cache_activations(ctx, model, corpus, spec.hookpoints, spec.cache)
        # a sweep's dictionaries on one hookpoint train from one pass over the cache, then each goes on
        trained = [
            dictionary
            for hookpoint, cfgs in sweep_groups(spec.dictionary_jobs())
            for dictionary in train_dictionaries_task(ctx, cache, hookpoint, cfgs)
        ]
        for dictionary in trained:
            evaluation = (
                evaluate_dictionary(ctx, dictionary, cache, spec.evaluate) if spec.evaluate.enabled else None
            )
            labeling = label_features(ctx, dictionary, cache, spec.label) if spec.label.enabled else None
            results.append(DictionaryResult(dictionary=dictionary, evaluation=evaluation, labeling=labeling))
        interactions = (
            score_interactions(ctx, spec.interactions, cache, trained, spec.dictionary_jobs())
            if spec.interactions.enabled
            else None
        )
        result = PipelineResult(
            mlflow_run_id=ctx.parent_run_id,
            model=model,
            corpus=corpus,
            cache=cache,
            dictionaries=results,
            interactions=interactions,
        )
        log_summary(ctx, result)
    return result
