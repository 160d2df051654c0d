"""The pipeline flow: the stages in order, as the spec declares them. No maths and no I/O here.

The spec is checked against the machine first (`flows/plan.py::preflight`: paths, the held-out budget,
the model's config and hookpoints, each stage's memory), so nothing starts that cannot finish. A sweep's
members fail independently: a failed training, evaluation or labeling is recorded in the result's
`failures` while the other members go on (`tasks/tracking/members.py`).
"""

from __future__ import annotations

from datetime import datetime

from prefect import flow
from prefect.runtime import flow_run

from featureatlas.flows.plan import preflight
from featureatlas.schemas.artifacts import DictionaryResult, PipelineResult
from featureatlas.schemas.settings import Settings
from featureatlas.schemas.spec import PipelineSpec
from featureatlas.tasks.activations.task import cache_activations, prepare_corpus, register_model
from featureatlas.tasks.dictionary.task import sweep_groups, train_dictionaries_task
from featureatlas.tasks.evaluate.task import evaluate_dictionary
from featureatlas.tasks.interactions.task import score_interactions
from featureatlas.tasks.labeling.task import label_features
from featureatlas.tasks.tracking.fanout import task_pool
from featureatlas.tasks.tracking.members import member_label, settle
from featureatlas.tasks.tracking.pipeline_run import log_summary, pipeline_run


def run_name() -> str:
    """Flow runs are named by their spec and start time ('demo 2026-01-31 03:00'), not at random."""
    spec = flow_run.parameters.get("spec")
    name = spec.name if isinstance(spec, PipelineSpec) else (spec or {}).get("name", "pipeline")
    return f"{name} {datetime.now().strftime('%Y-%m-%d %H:%M:%S')}"


@flow(name="featureatlas-pipeline", flow_run_name=run_name)
def pipeline_flow(spec: PipelineSpec, progress: bool = False) -> PipelineResult:
    settings = Settings()
    preflight(spec, settings)
    with pipeline_run(settings, spec, progress) as ctx:
        model = corpus = cache = None  # a spec may hold only an `interactions` section
        if spec.model is not None:
            model = register_model(ctx, spec.model)
            corpus = prepare_corpus(ctx, spec.corpus)
            cache = cache_activations(ctx, model, corpus, spec.hookpoints, spec.cache)
        # a sweep's dictionaries on one hookpoint train from one pass over the cache (one job per group);
        # the groups, then each dictionary's evaluation and labeling, fan out through the settings' runner
        with task_pool(settings) as pool:
            jobs = sweep_groups(spec.dictionary_jobs())
            groups = [{"ctx": ctx, "cache": cache, "hookpoint": h, "cfgs": cfgs} for h, cfgs in jobs]
            trained, failures = settle(
                "train_dictionary",
                [member_label(h, cfgs) for h, cfgs in jobs],
                pool.run_each(train_dictionaries_task, groups),
            )
            dictionaries = [d for refs in trained if refs is not None for d in refs]
            each = [{"ctx": ctx, "dictionary": d, "cache": cache} for d in dictionaries]
            ids = [d.id for d in dictionaries]
            # evaluation and labeling hook into the one loaded model: shares_model keeps threads apart
            evaluations, labelings = [None] * len(each), [None] * len(each)
            if spec.evaluate.enabled:
                calls = [j | {"spec": spec.evaluate} for j in each]
                evaluations, failed = settle(
                    "evaluate_dictionary", ids, pool.run_each(evaluate_dictionary, calls, True)
                )
                failures += failed
            if spec.label.enabled:
                calls = [j | {"spec": spec.label} for j in each]
                labelings, failed = settle("label_features", ids, pool.run_each(label_features, calls, True))
                failures += failed
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
            failures=failures,
        )
        log_summary(ctx, result)
    return result
