"""The public API on a real pipeline run (tiny Llama, a two-dictionary sweep, a real Prefect test server,
SQLite catalog and MLflow store): every function returns what the run made, as data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import torch

import featureatlas as fa
from featureatlas.schemas.artifacts import DictionaryRef, EvalReport, PipelineResult
from featureatlas.schemas.methods import TopKConfig
from featureatlas.tasks.dictionary import train_dictionary
from tests.flows.test_pipeline import tiny_spec

SWEEP = [{"method": "topk", "d_sae": 64, "k": k, "batch_size": 256, "epochs": 1} for k in (2, 4)]


@pytest.fixture(scope="module")
def made(tmp_path_factory, prefect_harness) -> tuple[PipelineResult, Path, dict]:  # noqa: ARG001
    """One real run of a two-dictionary sweep, in a home of its own (FEATUREATLAS_HOME for the module)."""
    tmp = tmp_path_factory.mktemp("api")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEATUREATLAS_HOME", str(tmp / "home"))
        spec = tiny_spec(tmp, dictionaries=SWEEP)
        spec["evaluate"] = {"max_tokens": 512, "ce_contexts": 4, "ablation_latents": 1, "steering_latents": 1}
        result = fa.run(spec)
        yield result, tmp / "home", spec


@pytest.mark.slow  # shares one pipeline run (about a minute on 2 busy cores)
def test_run_returns_the_result_and_plans_reuse(made):
    result, home, spec = made
    assert isinstance(result, PipelineResult) and len(result.dictionaries) == 2
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEATUREATLAS_HOME", str(home))
        stages = fa.run(spec, plan=True)
    assert [s.ident.kind for s in stages][:3] == ["model", "corpus", "activation_cache"]
    assert all(s.reuse for s in stages)  # everything the spec builds is finished
    assert {s.ident.id for s in stages} >= {d.dictionary.id for d in result.dictionaries}


@pytest.mark.slow  # shares one pipeline run (about a minute on 2 busy cores)
def test_catalog_list_is_a_frame_with_the_comparison_columns(made):
    result, home, _ = made
    cat = fa.catalog(home)
    frame = cat.list()
    assert isinstance(frame, pl.DataFrame)
    kinds = {"model", "corpus", "activation_cache", "dictionary", "evaluation", "labeling"}
    assert set(frame["kind"]) == kinds
    dicts = cat.list(kind="dictionary").sort("k")
    assert dicts["k"].to_list() == [2, 4] and dicts["method"].to_list() == ["topk", "topk"]
    assert dicts["d_sae"].to_list() == [64, 64] and set(dicts["hookpoint"]) == {"model.layers.1"}
    for row in dicts.iter_rows(named=True):  # a dictionary row carries its evaluation's figures
        ev = next(d.evaluation for d in result.dictionaries if d.dictionary.id == row["id"])
        assert (row["fvu"], row["l0"], row["ce_loss_score"]) == (ev.fvu, ev.l0, ev.ce_loss_score)
        assert row["evaluation_id"] == ev.id and row["cache_id"] == result.cache.id
    evals = cat.list("evaluation")
    assert evals.height == 2 and evals["method"].to_list() == ["topk", "topk"]
    assert cat.list("dictionary", where="k = 2")["k"].to_list() == [2]
    assert cat.list("dictionary", where=pl.col("k") > 2)["k"].to_list() == [4]
    assert cat.list(method="relu").height == 0
    assert cat.list(hookpoint="model.layers.1").height == 2 + 2 + 2  # dictionaries, evaluations, labelings
    with pytest.raises(ValueError, match="columns: id, kind"):
        cat.list(where="no_such_column > 1")
    with pytest.raises(ValueError, match="unknown kind 'dict'"):
        cat.list("dict")


@pytest.mark.slow  # shares one pipeline run (about a minute on 2 busy cores)
def test_get_lineage_and_resolve(made):
    result, home, _ = made
    cat = fa.catalog(home)
    d = result.dictionaries[0]
    got = cat.get(d.dictionary.id)
    assert isinstance(got, DictionaryRef)
    assert got.model_dump(exclude={"reused"}) == d.dictionary.model_dump(exclude={"reused"})
    lin = cat.lineage(d.dictionary.id)
    assert lin.ancestors == {result.cache.id: {result.model.id: {}, result.corpus.id: {}}}
    assert lin.descendants == {d.evaluation.id: {}, d.labeling.id: {}}
    assert lin.paths[d.dictionary.id] == d.dictionary.path and lin.paths[result.model.id] == result.model.path
    assert cat.resolve(d.evaluation.id, "dictionary").id == d.dictionary.id
    assert cat.resolve(d.labeling.id, "activation_cache").id == result.cache.id
    with pytest.raises(ValueError, match="no artifact 'dict-000000000000'"):
        cat.get("dict-000000000000")
    with pytest.raises(ValueError, match="leads to no labeling"):
        cat.resolve(result.model.id, "labeling")


@pytest.mark.slow  # shares one pipeline run (about a minute on 2 busy cores)
def test_load_dictionary_cache_features_and_evaluation(made):
    result, home, _ = made
    d = result.dictionaries[1]
    k = d.dictionary.config.k
    sae = fa.load_dictionary(d.dictionary.id, home=home)
    from_path = fa.load_dictionary(d.dictionary.path)
    assert torch.equal(sae.W_dec, from_path.W_dec) and sae.d_sae == 64

    cache = fa.load_cache(d.dictionary.id, home=home)
    assert cache.folder == Path(result.cache.path)
    batch = next(iter(cache.stream("model.layers.1", batch_size=32)))
    assert batch.acts.shape == (32, sae.d_in)
    codes = sae.encode(batch.acts)
    assert int((codes != 0).sum(-1).max()) <= k

    table = fa.features(d.dictionary.id, home=home)
    assert table.height == 64 and {"latent", "label", "frequency", "contexts"} <= set(table.columns)
    assert table.equals(fa.features(d.labeling.path))
    assert fa.evaluation(d.dictionary.id, home=home) == d.evaluation.model_copy(update={"reused": False})
    assert isinstance(fa.evaluation(d.evaluation.id, home=home), EvalReport)

    frontier = fa.compare(home=home)
    assert frontier.height == 2
    assert set(frontier["dictionary_id"]) == {x.dictionary.id for x in result.dictionaries}
    assert fa.atlas(d.dictionary.id, home=home).name == "index.html"
    fired = table.filter(pl.col("frequency") > 0)["latent"][0]
    assert fa.atlas(d.dictionary.id, latent=fired, home=home).is_file()
    shown = table.select(pl.coalesce("stat_label", "label")).to_series().drop_nulls()[0]  # as search shows
    hits = fa.search_features(shown, home=home)
    assert shown in hits["label"].to_list()
    assert set(hits["labeling_id"]) <= {x.labeling.id for x in result.dictionaries}


def test_train_is_the_trainer_on_a_tensor():
    torch.manual_seed(0)
    acts = torch.randn(512, 16)
    cfg = {"method": "topk", "d_sae": 64, "k": 4, "batch_size": 128, "epochs": 1, "seed": 3}
    out = fa.train(cfg, acts)
    same = train_dictionary(TopKConfig(**cfg), acts)
    assert torch.equal(out.dictionary.W_dec, same.dictionary.W_dec) and out.steps == 4
    assert out.final_metrics["l0"] <= 4
    with pytest.raises(ValueError, match="method"):
        fa.train({"method": "nope", "d_sae": 64}, acts)


def test_import_is_light_and_help_shows_the_api():
    code = (
        "import sys, json, featureatlas as fa, pydoc;"
        "heavy = [m for m in ('torch', 'prefect', 'mlflow', 'polars', 'sqlalchemy') if m in sys.modules];"
        "print(json.dumps({'heavy': heavy, 'help': pydoc.render_doc(fa, renderer=pydoc.plaintext)}))"
    )
    out = json.loads(subprocess.check_output([sys.executable, "-c", code]))
    assert out["heavy"] == []
    for name in fa.__all__:
        assert f"{name}(" in out["help"] or f"class {name}" in out["help"], name
