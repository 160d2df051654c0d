"""MLflow tracking on PostgreSQL, and a tracking store or catalog that cannot be reached."""

from __future__ import annotations

import time

import pytest
from mlflow.tracking import MlflowClient

from featureatlas.schemas.settings import Settings
from featureatlas.schemas.spec import parse_spec
from featureatlas.tasks.tracking.mlflow_runs import Tracker
from featureatlas.tasks.tracking.pipeline_run import pipeline_run
from featureatlas.tasks.tracking.retry import ServiceUnavailable
from tests.pg import PASSWORD, free_port


def test_mlflow_runs_on_postgresql(pg_cluster, tmp_path):
    uri = pg_cluster.url(pg_cluster.create_database())
    tracker = Tracker(uri, "featureatlas", tmp_path / "mlflow-artifacts")
    with tracker.run("pipeline") as parent, tracker.run("train_dictionary", parent.run_id) as child:
        child.log_params({"k": 4, "store": uri})
        child.log_metrics({"fvu": 0.5}, step=1)
        child.log_metrics({"fvu": 0.25}, step=2)
    client = MlflowClient(uri)
    run = client.get_run(child.run_id)
    assert run.data.tags["mlflow.parentRunId"] == parent.run_id and run.info.status == "FINISHED"
    assert run.data.params == {"k": "4", "store": uri.replace(PASSWORD, "***")}
    history = client.get_metric_history(child.run_id, "fvu")
    assert [(m.step, m.value) for m in history] == [(1, 0.5), (2, 0.25)]


@pytest.mark.parametrize("scheme", ["http", "postgresql+psycopg"])
def test_unreachable_tracking_store_fails_fast_naming_the_masked_url(scheme, tmp_path, monkeypatch):
    monkeypatch.setenv("FEATUREATLAS_RETRY_ATTEMPTS", "2")
    port = free_port()
    uri = f"{scheme}://lab:{PASSWORD}@127.0.0.1:{port}" + ("/mlflow" if scheme != "http" else "")
    start = time.monotonic()
    with pytest.raises(ServiceUnavailable) as e:
        Tracker(uri, "featureatlas", tmp_path)
    message = str(e.value)
    assert f"MLflow tracking store at {scheme}://lab:***@127.0.0.1:{port}" in message
    assert PASSWORD not in message and "FEATUREATLAS_MLFLOW_TRACKING_URI" in message
    # MLflow's own database retries would wait minutes; the probe gives up after two tries (0.5 s apart)
    assert time.monotonic() - start < 60


def test_unreachable_catalog_fails_before_anything_is_tracked(home, monkeypatch, tmp_path):
    monkeypatch.setenv("FEATUREATLAS_RETRY_ATTEMPTS", "2")
    bad = f"postgresql+psycopg://lab:{PASSWORD}@127.0.0.1:{free_port()}/catalog"
    settings = Settings(home=home.home, catalog_url=bad)
    spec = parse_spec({"name": "p", "model": {"path": str(tmp_path)}, "hookpoints": ["model.layers.0"],
                       "dictionaries": [{"method": "topk", "d_sae": 64, "k": 4}]})  # fmt: skip
    expected = r"catalog database at postgresql\+psycopg://lab:\*\*\*@"
    with pytest.raises(ServiceUnavailable, match=expected), pipeline_run(settings, spec):
        pytest.fail("the pipeline started although its catalog is unreachable")
    client = MlflowClient(home.mlflow_uri)
    exp = client.get_experiment_by_name(home.experiment)
    assert exp is None or client.search_runs([exp.experiment_id]) == []
