"""The pipeline flow: the stages in order, as the spec declares them. No maths and no I/O here."""

from __future__ import annotations

from prefect import flow

from featureatlas.schemas.artifacts import DictionaryResult, PipelineResult
from featureatlas.schemas.settings import Settings
from featureatlas.schemas.spec import PipelineSpec
from featureatlas.tasks.activations.task import cache_activations, prepare_corpus, register_model
from featureatlas.tasks.dictionary.task import sweep_groups, train_dictionaries_task
from featureatlas.tasks.evaluate.task import evaluate_dictionary
from featureatlas.tasks.interactions.task import score_interactions
from featureatlas.tasks.labeling.task import label_features
from featureatlas.tasks.tracking.fanout import task_pool
from featureatlas.tasks.tracking.pipeline_run import log_summary, pipeline_run


@flow(name="featureatlas-pipeline")
def pipeline_flow(spec: PipelineSpec, progress: bool = False) -> PipelineResult:
    settings = Settings()
    with pipeline_run(settings, spec, progress) as ctx:
        model = corpus = cache = None  # a spec may hold only an `interactions` section
        if spec.model is not None:
            model = register_model(ctx, spec.model)
            corpus = prepare_corpus(ctx, spec.corpus)
            cache = cache_activations(ctx, model, corpus, spec.hookpoints, spec.cache)
        # a sweep's dictionaries on one hookpoint train from one pass over the cache (one job per group);
        # the groups, then each dictionary's evaluation and labeling, fan out through the settings' runner
        with task_pool(settings) as pool:
            groups = [
                {"ctx": ctx, "cache": cache, "hookpoint": h, "cfgs": cfgs}
                for h, cfgs in sweep_groups(spec.dictionary_jobs())
            ]
            dictionaries = [d for refs in pool.run_all(train_dictionaries_task, groups) for d in refs]
            each = [{"ctx": ctx, "dictionary": d, "cache": cache} for d in dictionaries]
            # evaluation and labeling hook into the one loaded model: shares_model keeps threads apart
            evaluations = (
                pool.run_all(evaluate_dictionary, [j | {"spec": spec.evaluate} for j in each], True)
                if spec.evaluate.enabled
                else [None] * len(each)
            )
            labelings = (
                pool.run_all(label_features, [j | {"spec": spec.label} for j in each], True)
                if spec.label.enabled
                else [None] * len(each)
            )
        results = [
            DictionaryResult(dictionary=d, evaluation=e, labeling=lab)
            for d, e, lab in zip(dictionaries, evaluations, labelings)
        ]
        interactions = (
            score_interactions(ctx, spec.interactions, cache, dictionaries, spec.dictionary_jobs())
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
