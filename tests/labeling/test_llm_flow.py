"""The LLM labeler inside a real pipeline run (Prefect test server, SQLite catalog, MLflow store): against a
loopback OpenAI-compatible endpoint, and with a tiny local chat model. The API key reaches the endpoint and
nothing else: not MLflow params, tags or metrics, not the artifacts, not the logs."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import polars as pl
import pytest
from mlflow.tracking import MlflowClient

from featureatlas.schemas.spec import parse_spec
from featureatlas.tasks.labeling.lookup import search_labels
from featureatlas.tasks.tracking.catalog import open_catalog
from tests.flows.test_pipeline import pipeline, tiny_spec  # noqa: F401
from tests.helpers import build_tiny_llama, build_tiny_tokenizer
from tests.labeling import llm_server

SECRET = "sk-flow-secret-7f3a9c"


@pytest.fixture
def llm():
    state, httpd = llm_server.start()
    yield state
    httpd.shutdown()
    httpd.server_close()


def _label_run(home, parent_run_id: str):
    client = MlflowClient(home.mlflow_uri)
    exp = client.get_experiment_by_name(home.experiment)
    runs = client.search_runs([exp.experiment_id])
    label_run = next(
        r
        for r in runs
        if r.data.tags.get("featureatlas.stage") == "labeling"
        and r.data.tags.get("mlflow.parentRunId") == parent_run_id
    )
    return client, runs, label_run


def _llm_entries(labeling_path: str) -> pl.DataFrame:
    df = pl.read_parquet(Path(labeling_path) / "features.parquet")
    entries = df.select("latent", "labels").explode("labels").unnest("labels").drop_nulls("label_source")
    return entries.filter(pl.col("label_source") != "stat")


def test_flow_labels_with_an_openai_compatible_endpoint(tmp_path, home, pipeline, llm, monkeypatch, caplog):  # noqa: F811
    monkeypatch.setenv("FA_FLOW_LLM_KEY", SECRET)
    label = {
        "top_k": 5,
        "window": 4,
        "embedding_score": False,
        "llm": {
            "backend": "openai",
            "url": llm.url,
            "model": "tiny-rules",
            "api_key_env": "FA_FLOW_LLM_KEY",
            "max_features": 6,
            "detection_contexts": 2,
            "batch_size": 3,
        },
    }
    llm.fail_first = 1  # one 503 on the way: retried inside the stage
    spec = parse_spec(tiny_spec(tmp_path, evaluate={"enabled": False}, label=label))
    with caplog.at_level(logging.DEBUG):
        result = pipeline(spec)
    labeling = result.dictionaries[0].labeling

    entries = _llm_entries(labeling.path)
    # a latent whose commonest top token is whitespace gets an empty answer, hence no label
    n = entries.height
    assert 3 <= n <= 6 and set(entries["label_source"]) == {"llm:openai:tiny-rules"}
    assert entries["detection_score"].drop_nulls().len() == n
    # the rules server answers with the commonest marked token: the label is a token of the top contexts
    df = pl.read_parquet(Path(labeling.path) / "features.parquet")
    for latent, text in entries.select("latent", "label").iter_rows():
        tops = [t.strip() for t in df["top_tokens"][latent]]
        assert text in tops
    # 6 label requests + n * (2 + 2) detection requests were answered, plus the one 503
    client, runs, label_run = _label_run(home, result.mlflow_run_id)
    metrics = label_run.data.metrics
    assert metrics["llm_requests"] == 6 + n * 4 == len(llm.seen) - 1
    assert metrics["n_llm_labeled"] == n and metrics["llm_total_tokens"] > 0
    assert label_run.data.params["llm.api_key_env"] == "FA_FLOW_LLM_KEY"
    assert {s["auth"] for s in llm.seen} == {f"Bearer {SECRET}"}

    # the key is nowhere but in the environment and the requests
    for run in runs:
        logged = [*run.data.params.items(), *run.data.tags.items(), *run.data.metrics]
        assert not any(SECRET in str(x) for x in logged), run.info.run_name
    for path in Path(labeling.path).rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    assert SECRET not in caplog.text
    catalog = open_catalog(home.catalog)
    assert all(SECRET not in str(row.__dict__) for _, row in catalog.list())

    # LLM labels are searchable and shown in the atlas
    first = entries.row(0, named=True)
    hits = search_labels(catalog, first["label"])
    assert any(h["label_source"] == "llm:openai:tiny-rules" and h["latent"] == first["latent"] for h in hits)
    page = (Path(labeling.path) / "atlas" / "features" / f"{first['latent']}.html").read_text()
    assert "llm:openai:tiny-rules" in page and "<h2>Labels</h2>" in page


def test_flow_labels_with_a_tiny_local_chat_model(tmp_path, home, pipeline):  # noqa: F811, ARG001
    folder = tmp_path / "tiny-chat"
    build_tiny_llama(seed=1).save_pretrained(folder)
    tok = copy.deepcopy(build_tiny_tokenizer())
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    tok.save_pretrained(folder)
    label = {
        "top_k": 3,
        "window": 2,
        "embedding_score": False,
        "atlas": False,
        "llm": {
            "backend": "local",
            "model": str(folder),
            "max_features": 2,
            "max_new_tokens": 3,
            "detection_contexts": 1,
        },
    }
    spec = parse_spec(tiny_spec(tmp_path, evaluate={"enabled": False}, label=label))
    result = pipeline(spec)
    labeling = result.dictionaries[0].labeling
    _, _, label_run = _label_run(home, result.mlflow_run_id)
    metrics = label_run.data.metrics
    # 2 label prompts, and one detection prompt per side for each label the random model did not leave empty
    n_labels = int(metrics["n_llm_labeled"])
    assert metrics["llm_requests"] == 2 + 2 * n_labels
    assert 0 < metrics["llm_completion_tokens"] <= 2 * 3 + 2 * n_labels * 3
    assert metrics["llm_prompt_tokens"] > 10 * metrics["llm_requests"]
    entries = _llm_entries(labeling.path)
    assert entries.height == n_labels
    assert set(entries["label_source"]) <= {f"llm:local:{folder}"}
