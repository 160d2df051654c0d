"""A real pipeline run leaves lineage MLflow can show: the experiment in model-training mode, the dictionary
as a logged model (training run as source, config as params, evaluation metrics tied to the evaluation run and
the cache's dataset), datasets with a schema and a source naming the run that made them, and the headline
figures of each dictionary on the parent run. A second run that reuses the dictionary adds no second model;
in headless Chromium, the MLflow UI shows the columns and the dictionary's page with its links."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
from mlflow.tracking import MlflowClient

from featureatlas.tasks.tracking.lineage import EXPERIMENT_KIND, record_lineage, runs_table_route
from featureatlas.tasks.tracking.stage import tracker_for
from tests.tracking.browser import chromium, free_port, keep_screenshot, needs_chromium
from tests.tracking.lineage_run import run_tiny_pipeline

pytestmark = pytest.mark.slow
WIDE = "--window-size=1800,1000"  # the runs grid renders only the columns in view


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("work")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, work, prefect_harness):  # noqa: ARG001
    return run_tiny_pipeline(tmp_path_factory.mktemp("home"), work)


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


def test_a_run_reusing_the_dictionary_adds_no_second_model(tiny_run, work):
    settings, first = tiny_run
    _, second = run_tiny_pipeline(settings.home_dir, work)
    d = second.dictionaries[0]
    assert d.dictionary.reused and d.dictionary.id == first.dictionaries[0].dictionary.id
    client = MlflowClient(settings.mlflow_uri)
    (model,) = client.search_logged_models([client.get_run(first.mlflow_run_id).info.experiment_id])
    assert len(model.metrics) == 6  # the reused evaluation is not linked again
    parent = client.get_run(second.mlflow_run_id)
    assert [o.model_id for o in parent.outputs.model_outputs] == [model.model_id]
    assert parent.data.metrics["dict0.fvu"] == pytest.approx(d.evaluation.fvu)


@pytest.fixture
def mlflow_ui(tiny_run):
    """The MLflow UI on the run's store, on loopback; its whole process group is stopped afterwards."""
    settings, _ = tiny_run
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", settings.mlflow_uri]
        + ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5):
                    break
            except OSError:
                assert proc.poll() is None, "the MLflow server exited"
                assert time.monotonic() < deadline, "the MLflow UI did not answer within 180 s"
                time.sleep(1)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


@needs_chromium
def test_mlflow_ui_shows_columns_and_the_dictionary_page_links_its_lineage(tiny_run, mlflow_ui, tmp_path):
    settings, result = tiny_run
    d = result.dictionaries[0]
    client = MlflowClient(settings.mlflow_uri)
    experiment_id = client.get_run(result.mlflow_run_id).info.experiment_id
    (model,) = client.search_logged_models([experiment_id])

    # the runs table, in model-training mode, with the shared view's columns: dict0's FVU, L0, CE-loss score
    runs_url = f"{mlflow_ui}/{runs_table_route(experiment_id)}"
    dom = chromium([WIDE, "--dump-dom", runs_url], tmp_path / "profile", budget_ms=20000)
    for key in ("fvu", "l0", "ce_loss_score"):
        assert f'col-id="metrics.`dict0.{key}`"' in dom, key
    assert repr(d.evaluation.fvu)[:8] in dom  # the value itself, in the parent run's row
    assert "Model training" in dom and "share key" not in dom
    shot = tmp_path / "mlflow_runs.png"
    chromium([f"--screenshot={shot}", WIDE, runs_url], tmp_path / "profile", 20000)
    assert shot.stat().st_size > 20_000
    keep_screenshot(shot)

    # the dictionary's logged-model page: its training run, its evaluation run, the cache it was measured on
    route = f"#/experiments/{experiment_id}/models/{model.model_id}?workflowType=machine_learning"
    model_url = f"{mlflow_ui}/{route}"
    dom = chromium([WIDE, "--dump-dom", model_url], tmp_path / "profile", budget_ms=20000)
    assert d.dictionary.id in dom
    assert f'href="#/experiments/{experiment_id}/runs/{d.dictionary.mlflow_run_id}"' in dom
    assert f'href="#/runs/{d.evaluation.mlflow_run_id}"' in dom
    assert f"{result.cache.id} (#{result.cache.fingerprint[:32]})" in dom
    shot = tmp_path / "mlflow_dictionary.png"
    chromium([f"--screenshot={shot}", WIDE, model_url], tmp_path / "profile", 20000)
    assert shot.stat().st_size > 20_000
    keep_screenshot(shot)
