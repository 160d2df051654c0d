"""Lineage in MLflow's own terms, so its UI can be clicked through: datasets, logged models, experiment kind.

- Every artifact a stage consumes is an MLflow dataset with a schema and a source naming the run that
  produced it (`datasets.py`).
- Every dictionary becomes an MLflow *logged model* (named by its catalog id) whose source is its training
  run, with its config as params; its evaluation's headline metrics are logged on the evaluation run, linked
  to the model and to the held-out dataset (the activation cache) they were measured on. The model page then
  shows the training run, the evaluation run and the cache; the evaluation and labeling runs list the model
  as an input and the training and pipeline runs as an output.
- The experiment is marked as model training (`mlflow.experimentKind`): MLflow 3 otherwise may open it in its
  GenAI view (traces, judges), which has no place for runs' metrics as columns.
- The runs table shows no metric columns until they are picked, so the experiment carries a shared view
  (the experiment tag MLflow's own "share view" writes) whose columns are each dictionary's FVU, L0 and
  CE-loss score on the pipeline run; `runs_table_route` is the UI route that opens it in model-training mode.

Models are linked after the pipeline's stages ran, from one place, so stages fanned out to threads or Dask
workers never race to create the same model; a model found again (a reused dictionary) is not duplicated.
Two pipelines finishing at once would still race on the experiment's tags (MLflow's SQL store reads, then
inserts) and on finding-or-creating a model, so `record_lineage` holds the store's cross-process lock.
"""

from __future__ import annotations

import json
import time

from mlflow.entities import LoggedModelInput, LoggedModelOutput, Metric
from mlflow.exceptions import MlflowException

from featureatlas.schemas.artifacts import ActivationCacheRef, DictionaryRef, EvalReport, PipelineResult
from featureatlas.tasks.tracking.mlflow_runs import Tracker, _write, flatten
from featureatlas.tasks.tracking.mlflow_store import store_lock
from featureatlas.tasks.tracking.secrets import mask_secrets

__all__ = [
    "EXPERIMENT_KIND",
    "VIEW_KEY",
    "dictionary_title",
    "logged_model",
    "mark_model_training",
    "record_lineage",
    "runs_table_route",
]

EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
# the evaluation figures a dictionary is compared by; they become the logged model's metrics
HEADLINE = ("fvu", "l0", "ce_loss_score", "dead_fraction", "explained_variance", "mse")
# the parent run's per-dictionary figures shown as columns of the shared runs-table view
COLUMNS = ("fvu", "l0", "ce_loss_score")
VIEW_KEY = "dictionaries"
_VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"


def runs_table_route(experiment_id: str) -> str:
    """The UI route (after the server's address) of the runs table with the dictionaries' columns."""
    return f"#/experiments/{experiment_id}/runs?workflowType=machine_learning&viewStateShareKey={VIEW_KEY}"


def share_columns_view(tracker: Tracker, n_dictionaries: int) -> None:
    """Add `dict<i>.fvu`, `.l0`, `.ce_loss_score` and the `dict<i>` tag (i < n) to the shared view."""
    if n_dictionaries == 0:
        return
    client = tracker.client
    tags = _write(client, client.get_experiment, tracker.experiment_id).tags
    state = json.loads(tags.get(_VIEW_TAG, "{}"))
    columns = list(state.get("selectedColumns", []))
    for i in range(n_dictionaries):
        for key in [f"metrics.`dict{i}.{m}`" for m in COLUMNS] + [f"tags.`dict{i}`"]:
            if key not in columns:
                columns.append(key)
    if columns != state.get("selectedColumns"):
        state["selectedColumns"] = columns
        _set_experiment_tag(client, tracker.experiment_id, _VIEW_TAG, json.dumps(state))


def _set_experiment_tag(client, experiment_id: str, key: str, value: str) -> None:
    """Set an experiment tag; a tracking server's store may insert the same new tag for another client at
    once, and the loser's insert fails: repeated, it finds the row and updates it."""
    try:
        _write(client, client.set_experiment_tag, experiment_id, key, value)
    except MlflowException:
        time.sleep(0.2)
        _write(client, client.set_experiment_tag, experiment_id, key, value)


def dictionary_title(ref: DictionaryRef) -> str:
    """One line telling a sweep's dictionaries apart: "dict-0123abcd4567: topk d_sae=64 k=4 @ mlp_out.3"."""
    k = getattr(ref.config, "k", None)
    sparsity = "" if k is None else f" k={k}"
    return f"{ref.id}: {ref.config.method} d_sae={ref.d_sae}{sparsity} @ {ref.hookpoint}"


def mark_model_training(tracker: Tracker) -> None:
    """Open the experiment in MLflow's model-training view, unless someone chose a kind for it already."""
    client, key = tracker.client, EXPERIMENT_KIND[0]
    if key not in _write(client, client.get_experiment, tracker.experiment_id).tags:
        _set_experiment_tag(client, tracker.experiment_id, *EXPERIMENT_KIND)


def logged_model(tracker: Tracker, ref: DictionaryRef) -> str:
    """The id of the logged model of dictionary `ref`, created (from its training run) if it has none yet."""
    client = tracker.client
    found = _write(
        client,
        client.search_logged_models,
        [tracker.experiment_id],
        filter_string=f"name = '{ref.id}'",
        max_results=1,
    )
    if found:
        return found[0].model_id
    params = flatten(ref.config.model_dump(mode="json")) | {
        "hookpoint": ref.hookpoint,
        "d_in": str(ref.d_in),
        "d_sae": str(ref.d_sae),
        "cache_id": ref.cache_id,
    }
    model = _write(
        client,
        client.create_logged_model,
        tracker.experiment_id,
        name=ref.id,
        source_run_id=ref.mlflow_run_id,
        params=mask_secrets(params),
        tags={"featureatlas.artifact_id": ref.id, "featureatlas.artifact_path": ref.path},
        model_type=f"dictionary/{ref.config.method}",
    )
    _write(client, client.finalize_logged_model, model.model_id, "READY")
    if ref.mlflow_run_id:
        _link(tracker, ref.mlflow_run_id, [model.model_id], output=True)
    return model.model_id


def _link(tracker: Tracker, run_id: str, model_ids: list[str], output: bool) -> None:
    """Add the models to the run's outputs (or inputs), leaving out those it lists already."""
    client = tracker.client
    run = _write(client, client.get_run, run_id)
    listed = run.outputs.model_outputs if output else run.inputs.model_inputs
    new = [i for i in model_ids if i not in {m.model_id for m in listed or []}]
    if new and output:
        _write(client, client.log_outputs, run_id, [LoggedModelOutput(i, 0) for i in new])
    elif new:
        _write(client, client.log_inputs, run_id, models=[LoggedModelInput(i) for i in new])


def link_evaluation(tracker: Tracker, model_id: str, report: EvalReport, cache: ActivationCacheRef) -> None:
    """Log `report`'s headline figures on its run, tied to the model and to the cache's dataset (once)."""
    client = tracker.client
    if report.mlflow_run_id is None:
        return
    linked = _write(client, client.get_logged_model, model_id).metrics or []
    if any(m.run_id == report.mlflow_run_id for m in linked):
        return  # linked by an earlier pipeline run that made or reused the same evaluation
    now = int(time.time() * 1000)
    metrics = [
        Metric(
            key,
            float(getattr(report, key)),
            now,
            0,
            model_id=model_id,
            dataset_name=cache.id,
            dataset_digest=cache.fingerprint[:32],
        )
        for key in HEADLINE
    ]
    _write(client, client.log_batch, report.mlflow_run_id, metrics=metrics)
    _link(tracker, report.mlflow_run_id, [model_id], output=False)


def record_lineage(tracker: Tracker, result: PipelineResult) -> list[str]:
    """Give every dictionary of `result` its logged model and links; returns the models' ids in order."""
    with store_lock(tracker.uri):
        return _record(tracker, result)


def _record(tracker: Tracker, result: PipelineResult) -> list[str]:
    mark_model_training(tracker)
    share_columns_view(tracker, len(result.dictionaries))
    ids = []
    for d in result.dictionaries:
        model_id = logged_model(tracker, d.dictionary)
        ids.append(model_id)
        if d.evaluation is not None and result.cache is not None:
            link_evaluation(tracker, model_id, d.evaluation, result.cache)
        if d.labeling is not None and d.labeling.mlflow_run_id:
            _link(tracker, d.labeling.mlflow_run_id, [model_id], output=False)
    _link(tracker, result.mlflow_run_id, ids, output=True)
    return ids
