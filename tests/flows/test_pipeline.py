"""The whole flow under a real Prefect test server, with a real catalog and a real MLflow store, each test on
SQLite and on PostgreSQL (the `backend` fixture): artifacts, lineage, nested runs, reuse and failures land the
same on both, and the database password reaches no MLflow param or tag."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from featureatlas.schemas.spec import parse_spec
from featureatlas.tasks.tracking.catalog import open_catalog
from tests.helpers import TINY_TEXT, save_tiny_llama
from tests.pg import PASSWORD


def tiny_spec(tmp_path: Path, **overrides) -> dict:
    model_dir = save_tiny_llama(tmp_path / "tiny-llama")
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": " ".join(TINY_TEXT[i : i + 6])}) for i in range(24)))
    spec = {
        "name": "tiny",
        "model": {"path": str(model_dir)},
        "corpus": {
            "sources": [str(corpus)],
            "context_length": 32,
            "max_tokens": 4096,
            "heldout_fraction": 0.25,
        },
        "hookpoints": ["model.layers.1"],
        "cache": {"shard_tokens": 512, "batch_size": 8},
        "dictionaries": [{"method": "topk", "d_sae": 64, "k": 4, "batch_size": 256, "epochs": 2}],
        "evaluate": {"max_tokens": 1024, "ce_contexts": 8},
        # MiniLM scoring is tested on its own (tests/labeling); loading it here would only add time
        "label": {"top_k": 5, "window": 4, "embedding_score": False},
    }
    spec.update(overrides)
    return spec


@pytest.fixture
def pipeline(prefect_harness):  # noqa: ARG001
    from featureatlas.flows.pipeline import pipeline_flow

    return pipeline_flow


def second_details_roundtrip(report) -> bool:
    """The nested details survive the catalog's JSON, as a reused run reads them back."""
    return type(report).model_validate(report.model_dump(mode="json")).details == report.details


def test_flow_tracks_registers_and_reuses(tmp_path, backend, home, pipeline):
    spec = parse_spec(tiny_spec(tmp_path))
    first = pipeline(spec)

    # every artifact exists on disk, in the catalog, with the expected lineage
    catalog = open_catalog(home.catalog)
    assert catalog.engine.dialect.name == backend
    d = first.dictionaries[0]
    ids = {first.model.id, first.corpus.id, first.cache.id, d.dictionary.id, d.evaluation.id, d.labeling.id}
    assert {r.id for _, r in catalog.list()} == ids
    assert set(catalog.edges()) == {
        (first.cache.id, first.model.id),
        (first.cache.id, first.corpus.id),
        (d.dictionary.id, first.cache.id),
        (d.evaluation.id, d.dictionary.id),
        (d.evaluation.id, first.cache.id),
        (d.labeling.id, d.dictionary.id),
        (d.labeling.id, first.cache.id),
    }
    for ref in (first.cache, d.dictionary, d.evaluation, d.labeling):
        assert Path(ref.path).is_dir() and not ref.reused
    assert (Path(d.dictionary.path) / "cfg.json").is_file()
    assert (Path(d.dictionary.path) / "weights.safetensors").is_file()
    assert 0.0 <= d.evaluation.dead_fraction <= 1.0 and d.evaluation.l0 <= 4 + 1e-6
    assert (Path(d.labeling.path) / "atlas" / "index.html").is_file()

    # MLflow: one parent run, one nested run per stage, inputs recorded for lineage
    client = MlflowClient(home.mlflow_uri)
    exp = client.get_experiment_by_name(home.experiment)
    children = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{first.mlflow_run_id}'"
    )
    stages = sorted(r.data.tags["featureatlas.stage"] for r in children)
    assert stages == sorted(["model", "corpus", "activation_cache", "dictionary", "evaluation", "labeling"])
    train_run = next(r for r in children if r.data.tags["featureatlas.stage"] == "dictionary")
    assert [i.dataset.name for i in train_run.inputs.dataset_inputs] == [first.cache.id]
    assert len(client.get_metric_history(train_run.info.run_id, "fvu")) >= 2
    assert train_run.data.params["k"] == "4"
    label_run = next(r for r in children if r.data.tags["featureatlas.stage"] == "labeling")
    logged = {a.path for a in client.list_artifacts(label_run.info.run_id, "atlas")}
    assert "atlas/index.html" in logged and "atlas/features" in logged
    eval_run = next(r for r in children if r.data.tags["featureatlas.stage"] == "evaluation")
    assert eval_run.data.metrics["ce_loss_score"] == pytest.approx(d.evaluation.ce_loss_score)
    details = d.evaluation.details
    assert eval_run.data.metrics["kl_spliced"] == pytest.approx(details.kl_spliced)
    assert details.ce_loss_score_mean is not None and details.ablations and len(details.steering) == 4
    assert 0 <= details.geometry.coherence <= 1 + 1e-6
    assert sum(details.freq_hist_counts) == round((1 - d.evaluation.dead_fraction) * d.dictionary.d_sae)
    assert second_details_roundtrip(d.evaluation)

    # a re-run reuses every stage: same ids, no new rows, nested runs say so
    second = pipeline(spec)
    assert second.dictionaries[0].dictionary.id == d.dictionary.id
    assert second.cache.reused and second.dictionaries[0].dictionary.reused
    assert second.dictionaries[0].evaluation.fvu == d.evaluation.fvu
    assert second.dictionaries[0].evaluation.details == d.evaluation.details
    assert len(catalog.list()) == len(ids)
    rerun = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{second.mlflow_run_id}'"
    )
    assert len(rerun) == 6
    assert all(r.data.tags.get("featureatlas.reused_from_run") for r in rerun)
    for r in client.search_runs([exp.experiment_id]):
        assert PASSWORD not in str(r.data.params) + str(r.data.tags)

    # a changed dictionary config trains anew but reuses the cache
    spec2 = parse_spec(
        tiny_spec(
            tmp_path, dictionaries=[{"method": "topk", "d_sae": 64, "k": 2, "batch_size": 256, "epochs": 1}]
        )
    )
    third = pipeline(spec2)
    assert third.cache.reused and not third.dictionaries[0].dictionary.reused
    assert third.dictionaries[0].dictionary.id != d.dictionary.id


def test_failed_stage_leaves_no_artifact(tmp_path, backend, home, pipeline):  # noqa: ARG001
    # documents too short for a context: the plan cannot know without tokenizing, the cache stage fails
    short = tmp_path / "short.jsonl"
    short.write_text("\n".join(json.dumps({"text": "a cat"}) for _ in range(8)))
    spec = tiny_spec(tmp_path)
    spec["corpus"]["sources"] = [str(short)]
    with pytest.raises(ValueError, match="the corpus yields no context"):
        pipeline(parse_spec(spec))
    catalog = open_catalog(home.catalog)
    assert [k for k, _ in catalog.list()] == ["model", "corpus"]  # the cache was never registered
    leftovers = (
        list((home.artifacts_dir / "activation_cache").glob("*"))
        if (home.artifacts_dir / "activation_cache").exists()
        else []
    )
    assert leftovers == []
    client = MlflowClient(home.mlflow_uri)
    exp = client.get_experiment_by_name(home.experiment)
    failed = client.search_runs([exp.experiment_id], filter_string="attributes.status = 'FAILED'")
    assert {r.data.tags.get("featureatlas.stage", "pipeline") for r in failed} == {
        "activation_cache",
        "pipeline",
    }
