"""A sweep through the real flow: one member diverges, so the flow fails naming it and the step, registers
neither dictionary and keeps both checkpoints; with the lr fixed, the next run resumes the other member in its
MLflow run and trains the fixed one afresh. On SQLite and on PostgreSQL (reopening a failed run there too)."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from featureatlas.schemas.spec import parse_spec
from featureatlas.tasks.tracking.catalog import open_catalog
from tests.flows.test_pipeline import pipeline, tiny_spec  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow  # two flow runs (~1 minute on 2 cores)

COMMON = {"d_sae": 32, "batch_size": 64, "steps": 30, "checkpoint_every": 1, "log_every": 1}


def test_a_diverging_member_fails_the_sweep_and_the_fixed_rerun_resumes(tmp_path, backend, home, pipeline):  # noqa: F811
    off = {"evaluate": {"enabled": False}, "label": {"enabled": False}}
    sweep = [{"method": "topk", "k": 4, **COMMON}, {"method": "relu", "lr": 50.0, **COMMON}]
    with pytest.raises(FloatingPointError, match=r"relu \(d_sae=32\): loss .* at step \d+"):
        pipeline(parse_spec(tiny_spec(tmp_path, dictionaries=sweep, **off)))
    catalog = open_catalog(home.catalog)
    assert catalog.engine.dialect.name == backend
    assert "dictionary" not in {kind for kind, _ in catalog.list()}
    partials = sorted((home.artifacts_dir / "dictionary").glob("*.partial"))
    assert len(partials) == 2 and all(list(p.glob("checkpoints/step-*/state.json")) for p in partials)
    run_ids = {p.name: (p.parent / f"{p.name}.run").read_text() for p in partials}

    sweep[1]["lr"] = 1e-3
    result = pipeline(parse_spec(tiny_spec(tmp_path, dictionaries=sweep, **off)))
    topk, relu = (d.dictionary for d in result.dictionaries)
    assert run_ids[f"{topk.id}.partial"] == topk.mlflow_run_id  # resumed in the run of the failed attempt
    assert relu.mlflow_run_id not in run_ids.values()  # a new config: a new dictionary, a new run
    client = MlflowClient(home.mlflow_uri)
    assert sorted({m.step for m in client.get_metric_history(topk.mlflow_run_id, "loss")}) == list(
        range(1, 31)
    )
    assert {kind for kind, _ in catalog.list()} >= {"dictionary"} and len(catalog.list("dictionary")) == 2
