"""The whole flow with its catalog and its MLflow store both on PostgreSQL (a real throwaway cluster): the
artifacts, their lineage and the nested runs land there, a re-run reuses every stage, and the database
password appears in no MLflow param or tag."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from schemas.settings import Settings
from schemas.spec import parse_spec
from tasks.tracking.catalog import Catalog
from tests.flows.test_pipeline import tiny_spec
from tests.pg import PASSWORD

pytestmark = pytest.mark.slow  # two whole flow runs; `make test` runs it in CI


@pytest.fixture
def pg_settings(pg_cluster, home, monkeypatch) -> Settings:  # noqa: ARG001
    monkeypatch.setenv("FEATUREATLAS_CATALOG_URL", pg_cluster.url(pg_cluster.create_database()))
    monkeypatch.setenv("FEATUREATLAS_MLFLOW_TRACKING_URI", pg_cluster.url(pg_cluster.create_database()))
    return Settings()


def test_pipeline_on_postgresql(tmp_path, pg_settings, prefect_harness):  # noqa: ARG001
    from flows.pipeline import pipeline_flow

    spec = parse_spec(tiny_spec(tmp_path, evaluate={"enabled": False}, label={"enabled": False}))
    first = pipeline_flow(spec)
    catalog = Catalog(pg_settings.catalog)
    assert catalog.engine.dialect.name == "postgresql"
    d = first.dictionaries[0].dictionary
    assert {r.id for _, r in catalog.list()} == {first.model.id, first.corpus.id, first.cache.id, d.id}
    assert catalog.parents(d.id) == [first.cache.id]
    assert catalog.parents(first.cache.id) == sorted([first.model.id, first.corpus.id])

    client = MlflowClient(pg_settings.mlflow_uri)
    exp = client.get_experiment_by_name(pg_settings.experiment)
    runs = client.search_runs([exp.experiment_id])
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == first.mlflow_run_id]
    assert sorted(r.data.tags["featureatlas.stage"] for r in children) == sorted(
        ["model", "corpus", "activation_cache", "dictionary"]
    )
    for r in runs:
        assert PASSWORD not in str(r.data.params) + str(r.data.tags)

    second = pipeline_flow(spec)
    assert second.dictionaries[0].dictionary.id == d.id and second.dictionaries[0].dictionary.reused
    assert len(catalog.list()) == 4
