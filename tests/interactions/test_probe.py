"""Probes on dictionary latents through the real pipeline, interactions-only specs, and their checks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import polars as pl
import pytest
import yaml
from typer.testing import CliRunner

from featureatlas.flows.cli import app
from featureatlas.schemas.spec import SpecError, parse_spec
from featureatlas.tasks.common.shards import sha256_file
from featureatlas.tasks.interactions.probe import token_class
from featureatlas.tasks.tracking.catalog import open_catalog
from tests.flows.test_pipeline import tiny_spec
from tests.interactions.test_stage import planted_csv

runner = CliRunner()


def test_token_classes():
    tokens = [" The", "cat", " 42", "7", ".", " ;", " ", "A", " a1", " the"]
    assert token_class(tokens, "digit").tolist() == [0, 0, 1, 1, 0, 0, 0, 0, 0, 0]
    assert token_class(tokens, "capitalized").tolist() == [1, 0, 0, 0, 0, 0, 0, 1, 0, 0]
    assert token_class(tokens, "punctuation").tolist() == [0, 0, 0, 0, 1, 1, 0, 0, 0, 0]
    assert token_class(tokens, "space_prefixed").tolist() == [1, 0, 1, 0, 0, 1, 0, 0, 1, 1]
    assert token_class(tokens, "token: the").tolist() == [0] * 9 + [1]


def test_probe_on_the_pipelines_dictionary_then_an_interactions_only_spec(tmp_path, home, prefect_harness):  # noqa: ARG001
    from featureatlas.flows.pipeline import pipeline_flow

    inter = {"enabled": True, "source": "dictionary", "label": "capitalized", "n_latents": 4, "max_pairs": 4}
    inter |= {"reference": "linear", "n_null": 3, "n_permutations": 8}  # the wiring is under test here
    spec = parse_spec(
        tiny_spec(tmp_path, evaluate={"enabled": False}, label={"enabled": False}, interactions=inter)
    )
    result = pipeline_flow(spec)
    d, ref = result.dictionaries[0].dictionary, result.interactions
    assert ref.dictionary_id == d.id and ref.cache_id == result.cache.id
    scores = pl.read_parquet(Path(ref.path) / "scores.parquet")
    named = set(scores["feature_i"]) | set(scores["feature_j"])
    assert scores.height == ref.n_pairs == 4  # capped: 6 pairs of 4 latents, 4 scored
    assert named <= set(ref.features) and all(n.startswith("latent_") for n in ref.features)
    assert all(0 <= int(n.removeprefix("latent_")) < d.d_sae for n in ref.features)
    # the kept latents carry the label: the probe beats always predicting the base rate
    tokens = pl.read_parquet(Path(result.cache.path) / "tokens.parquet")
    rate = (
        tokens.filter(pl.col("position") > 0)["token"]
        .map_elements(lambda t: t.strip()[:1].isupper(), return_dtype=pl.Boolean)
        .mean()
    )
    assert ref.ref_loss < -(rate * math.log(rate) + (1 - rate) * math.log(1 - rate))
    catalog = open_catalog(home.catalog)
    assert {(ref.id, d.id), (ref.id, result.cache.id)} <= set(catalog.edges())
    assert catalog.parents(ref.id) == sorted([d.id, result.cache.id])

    # the same dictionary from the catalog, in a spec with nothing but an interactions section
    only = {"interactions": inter | {"dictionary": d.id, "model_class": "both", "n_retrain": 3, "rate": 0.3}}
    path = tmp_path / "probe.yaml"
    path.write_text(yaml.safe_dump(only))
    plan = json.loads(runner.invoke(app, ["run", str(path), "--plan", "--json"]).stdout)
    assert [p["stage"] for p in plan] == ["score_interactions"]
    assert plan[0]["parents"] == [d.id, result.cache.id]
    out = runner.invoke(app, ["run", str(path), "--json"])
    assert out.exit_code == 0, out.output
    again = json.loads(out.stdout)
    assert again["model"] is None and again["dictionaries"] == []
    probe = again["interactions"]
    assert probe["id"] == plan[0]["id"] and probe["dictionary_id"] == d.id and probe["n_retrained"] >= 1
    assert {p.name for p in Path(probe["path"]).iterdir()} >= {"swarm.png", "swarm_retrain.png", "halo.png"}
    assert catalog.parents(probe["id"]) == sorted([d.id, result.cache.id])


def test_interactions_only_table_spec_runs_and_records_the_table(tmp_path, home, prefect_harness):  # noqa: ARG001
    csv = planted_csv(tmp_path / "planted.csv")
    path = tmp_path / "spec.yaml"
    path.write_text(
        "interactions: {enabled: true, table: planted.csv, target: y, max_pairs: 3, n_null: 4,"
        " n_permutations: 10}\n"
    )
    out = runner.invoke(app, ["run", str(path)])
    assert out.exit_code == 0, out.output
    assert "x1 x x2" in out.output  # the planted pair, printed first
    kind, row = open_catalog(home.catalog).list()[0]
    assert kind == "interactions" and open_catalog(home.catalog).parents(row.id) == []
    # the table is not an artifact: its path and content hash are in the row's config instead
    assert row.config["table_path"] == str(csv) and row.config["table_sha256"] == sha256_file(csv)
    assert pl.read_parquet(Path(row.uri) / "scores.parquet").height == 3


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({}, "nothing to run: the spec has no `model`"),
        ({"interactions": {"table": "sklearn:wine"}}, "interactions are not enabled"),
        ({"hookpoints": ["h"], "interactions": {"enabled": True, "table": "sklearn:wine"}}, "no `model`"),
        ({"interactions": {"enabled": True}}, "interactions.table is required"),
        (
            {"interactions": {"enabled": True, "source": "dictionary", "label": "digit"}},
            "name one from the catalog by id",
        ),
        ({"interactions": {"enabled": True, "source": "dictionary"}}, "interactions.label is required"),
        ({"interactions": {"enabled": True, "label": "vowel"}}, "label 'vowel' not understood"),
        (
            {"interactions": {"enabled": True, "table": "sklearn:wine", "label": "digit"}},
            "add `source: dictionary`",
        ),
        (
            {"interactions": {"enabled": True, "source": "dictionary", "label": "digit", "table": "t.csv"}},
            "exclude each other",
        ),
        (
            {
                "model": {"path": "m"},
                "hookpoints": ["h"],
                "dictionaries": [{"method": "topk", "d_sae": 64, "k": 4}],
                "interactions": {"enabled": True, "source": "dictionary", "label": "digit", "dictionary": 1},
            },
            "index 1 is out of range; this spec trains 1",
        ),
        (
            {"model": {"path": "m"}, "dictionaries": [{"method": "topk", "d_sae": 64, "k": 4}]},
            "hookpoints: a",
        ),
    ],
)
def test_spec_parts_that_are_missing_say_what_to_add(raw, message):
    with pytest.raises(SpecError, match=message):
        parse_spec(raw)


def test_unknown_dictionary_id_is_named_by_the_plan(tmp_path, home):  # noqa: ARG001
    path = tmp_path / "spec.yaml"
    path.write_text(
        "interactions: {enabled: true, source: dictionary, dictionary: dict-000000000000, label: digit}\n"
    )
    out = runner.invoke(app, ["run", str(path), "--plan"])
    assert out.exit_code == 2 and "dict-000000000000" in out.output and "not a dictionary" in out.output
