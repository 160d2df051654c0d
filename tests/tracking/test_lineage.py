"""A real pipeline run leaves lineage MLflow can show: the experiment in model-training mode, the dictionary
as a logged model (training run as source, config as params, evaluation metrics tied to the evaluation run and
the cache's dataset), datasets with a schema and a source naming the run that made them, and the headline
figures of each dictionary on the parent run. A second run that reuses everything adds no second model."""

from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient

from featureatlas.tasks.tracking.lineage import EXPERIMENT_KIND, record_lineage
from featureatlas.tasks.tracking.stage import tracker_for
from tests.tracking.lineage_run import run_tiny_pipeline

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, prefect_harness):  # noqa: ARG001
    return run_tiny_pipeline(tmp_path_factory.mktemp("home"), tmp_path_factory.mktemp("work"))


def test_dictionary_is_a_logged_model_with_its_lineage(tiny_run):
    settings, result = tiny_run
    client = MlflowClient(settings.mlflow_uri)
    parent = client.get_run(result.mlflow_run_id)
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.tags[EXPERIMENT_KIND[0]] == "custom_model_development"

    d = result.dictionaries[0]
    (model,) = client.search_logged_models([experiment.experiment_id])
    assert model.name == d.dictionary.id and str(model.status) == "READY"
    assert model.source_run_id == d.dictionary.mlflow_run_id
    assert model.params["k"] == "4" and model.params["d_sae"] == "64" and model.params["method"] == "topk"
    assert model.params["hookpoint"] == d.dictionary.hookpoint
    by_key = {m.key: m for m in model.metrics}
    assert {"fvu", "l0", "ce_loss_score"} <= set(by_key)
    assert by_key["fvu"].value == pytest.approx(d.evaluation.fvu)
    assert by_key["fvu"].run_id == d.evaluation.mlflow_run_id
    assert by_key["fvu"].dataset_name == result.cache.id
    assert by_key["fvu"].dataset_digest == result.cache.fingerprint[:32]

    # the runs around it: the training run outputs the model, evaluation and labeling take it as input
    train = client.get_run(d.dictionary.mlflow_run_id)
    assert [o.model_id for o in train.outputs.model_outputs] == [model.model_id]
    for run_id in (d.evaluation.mlflow_run_id, d.labeling.mlflow_run_id):
        assert [i.model_id for i in client.get_run(run_id).inputs.model_inputs] == [model.model_id]
    assert model.model_id in [o.model_id for o in parent.outputs.model_outputs]

    # the parent run: each dictionary's headline figures, and a tag saying which dictionary dict0 is
    assert parent.data.metrics["dict0.fvu"] == pytest.approx(d.evaluation.fvu)
    assert {"dict0.l0", "dict0.ce_loss_score"} <= set(parent.data.metrics)
    assert parent.data.tags["dict0"].startswith(f"{d.dictionary.id}: topk d_sae=64 k=4 @ ")


def test_datasets_have_a_schema_and_name_their_producing_run(tiny_run):
    settings, result = tiny_run
    client = MlflowClient(settings.mlflow_uri)
    d = result.dictionaries[0]
    (cache_input,) = client.get_run(d.dictionary.mlflow_run_id).inputs.dataset_inputs
    ds = cache_input.dataset
    assert ds.name == result.cache.id and ds.source_type == "http"
    source = json.loads(ds.source)
    assert source["run_id"] == result.cache.mlflow_run_id and source["url"] == f"#/runs/{source['run_id']}"
    columns = {c["name"]: c["type"] for c in json.loads(ds.schema)["mlflow_colspec"]}
    hookpoint = d.dictionary.hookpoint
    assert columns["token_id"] == "long" and columns[f"acts/{hookpoint}"] == "float32 [n_tokens, 32]"
    profile = json.loads(ds.profile)
    assert profile["n_tokens"] == result.cache.n_tokens and profile["kind"] == "activation_cache"

    inputs = client.get_run(d.evaluation.mlflow_run_id).inputs.dataset_inputs
    dict_ds = next(i.dataset for i in inputs if i.dataset.name == d.dictionary.id)
    assert json.loads(dict_ds.source)["run_id"] == d.dictionary.mlflow_run_id
    codes = json.loads(dict_ds.schema)["mlflow_colspec"][1]
    assert codes == {"name": "codes", "type": "float32 [n_tokens, 64]"}


def test_recording_again_links_nothing_twice(tiny_run):
    settings, result = tiny_run
    tracker = tracker_for(settings)
    first = record_lineage(tracker, result)
    again = record_lineage(tracker, result)
    assert first == again
    (model,) = tracker.client.search_logged_models([tracker.experiment_id])
    assert sorted(m.key for m in model.metrics) == sorted(
        ["fvu", "l0", "ce_loss_score", "dead_fraction", "explained_variance", "mse"]
    )
