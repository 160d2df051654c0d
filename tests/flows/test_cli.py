"""The Typer CLI, driven as a user would through CliRunner."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import yaml
from typer.testing import CliRunner

from featureatlas.flows.cli import app
from tests.flows.test_pipeline import tiny_spec

runner = CliRunner()


def write_spec(tmp_path, **overrides):
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(tiny_spec(tmp_path, **overrides)))
    return path


def test_bad_spec_exits_2_with_the_key_path(tmp_path, home):  # noqa: ARG001
    path = tmp_path / "bad.yaml"
    path.write_text("model: {path: m}\nhookpoints: [h]\ndictionaries: [{method: topk, kk: 3}]\n")
    result = runner.invoke(app, ["run", str(path)])
    assert result.exit_code == 2
    assert "dictionaries.0.topk: unknown key 'kk'" in result.output


def test_missing_model_folder_is_reported_by_plan(tmp_path, home):  # noqa: ARG001
    path = write_spec(tmp_path, model={"path": str(tmp_path / "no-such-model")})
    result = runner.invoke(app, ["run", str(path), "--plan"])
    assert result.exit_code == 2
    assert f"model path '{tmp_path / 'no-such-model'}' does not exist" in result.output
    assert "hub" not in result.output


def test_unknown_catalog_kind_and_id(home):  # noqa: ARG001
    result = runner.invoke(app, ["catalog", "list", "--kind", "sae"])
    assert result.exit_code != 0 and "unknown kind 'sae'" in result.output
    result = runner.invoke(app, ["catalog", "show", "dict-000000000000"])
    assert result.exit_code == 1 and "no artifact 'dict-000000000000'" in result.output


def test_run_then_browse_catalog_and_plan_reuse(tmp_path, home, prefect_harness):  # noqa: ARG001
    path = write_spec(tmp_path)
    plan = json.loads(runner.invoke(app, ["run", str(path), "--plan", "--json"]).stdout)
    assert [s["kind"] for s in plan] == [
        "model",
        "corpus",
        "activation_cache",
        "dictionary",
        "evaluation",
        "labeling",
    ]
    assert not any(s["reuse"] for s in plan)

    result = runner.invoke(app, ["run", str(path), "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    dict_id = out["dictionaries"][0]["dictionary"]["id"]
    assert dict_id == plan[3]["id"]  # the plan predicted the id the run produced

    listed = json.loads(runner.invoke(app, ["catalog", "list", "--kind", "dictionary", "--json"]).stdout)
    assert [r["id"] for r in listed] == [dict_id]
    assert listed[0]["path"] == out["dictionaries"][0]["dictionary"]["path"]
    # the columns that tell dictionaries apart, with the evaluation's headline figures
    ev = out["dictionaries"][0]["evaluation"]
    assert {k: listed[0][k] for k in ("method", "hookpoint", "d_sae", "k", "status")} == {
        "method": "topk", "hookpoint": "model.layers.1", "d_sae": 64, "k": 4, "status": "labeled"
    }  # fmt: skip
    assert (listed[0]["fvu"], listed[0]["l0"]) == (ev["fvu"], ev["l0"])
    table = runner.invoke(app, ["catalog", "list", "--kind", "dictionary"]).output
    assert "topk" in table and "labeled" in table and f"{ev['fvu']:.3f}" in table
    below = json.loads(
        runner.invoke(app, ["catalog", "list", "--where", f"fvu <= {ev['fvu']}", "--json"]).stdout
    )
    assert sorted(r["kind"] for r in below) == ["dictionary", "evaluation", "labeling"]
    assert json.loads(runner.invoke(app, ["catalog", "list", "--method", "relu", "--json"]).stdout) == []
    by_fvu = json.loads(runner.invoke(app, ["catalog", "list", "--sort", "fvu", "--json"]).stdout)
    assert by_fvu[0]["fvu"] == ev["fvu"] and by_fvu[-1]["fvu"] is None
    bad = runner.invoke(app, ["catalog", "list", "--where", "fvu <"])
    assert bad.exit_code == 2 and "is not a condition over the columns" in bad.output
    readable = runner.invoke(app, ["catalog", "show", dict_id]).output
    assert not readable.lstrip().startswith("{") and readable.count("config") == 1 and "d_sae" in readable

    shown = json.loads(runner.invoke(app, ["catalog", "show", dict_id, "--json"]).stdout)
    assert shown["parents"] == [out["cache"]["id"]]
    assert len(shown["children"]) == 2

    lineage = json.loads(runner.invoke(app, ["catalog", "lineage", dict_id, "--json"]).stdout)
    assert lineage["ancestors"] == {out["cache"]["id"]: {out["model"]["id"]: {}, out["corpus"]["id"]: {}}}
    tree = runner.invoke(app, ["catalog", "lineage", dict_id]).output
    assert out["model"]["id"] in tree and out["dictionaries"][0]["evaluation"]["id"] in tree

    compared = runner.invoke(app, ["compare", "--out", str(tmp_path / "cmp"), "--json"])
    assert compared.exit_code == 0, compared.output
    rows = json.loads(compared.stdout)["rows"]
    assert [r["dictionary_id"] for r in rows] == [dict_id] and rows[0]["method"] == "topk"
    assert (tmp_path / "cmp" / "frontier.png").stat().st_size > 0
    # the feature atlas of the dictionary, and a label search across dictionaries
    labeling = Path(out["dictionaries"][0]["labeling"]["path"])
    dash = runner.invoke(app, ["dashboard", dict_id])
    assert dash.exit_code == 0, dash.output
    assert dash.stdout.strip() == (labeling / "atlas" / "index.html").as_uri()
    missing = runner.invoke(app, ["dashboard", "dict-000000000000"])
    assert missing.exit_code == 1 and "no labeling" in missing.output
    features = pl.read_parquet(labeling / "features.parquet")
    label = features.select(pl.coalesce("stat_label", "label")).to_series().drop_nulls()[0]
    hits = json.loads(runner.invoke(app, ["features", "search", label.upper(), "--json"]).stdout)
    assert hits and all(label.lower() in h["label"].lower() for h in hits)
    assert {h["dictionary_id"] for h in hits} == {dict_id} and Path(hits[0]["page"]).is_file()
    assert "features matching" in runner.invoke(app, ["features", "search", label]).output

    replan = json.loads(runner.invoke(app, ["run", str(path), "--plan", "--json"]).stdout)
    assert all(s["reuse"] for s in replan)

    # flow runs are named by their spec and start time
    flow_runs = json.loads(runner.invoke(app, ["runs", "--json"]).stdout)
    assert flow_runs and flow_runs[0]["name"].startswith("tiny 20")

    # removing the dictionary removes its evaluation and labeling (rows, edges, folders); a dry run first
    derived = [dict_id, out["dictionaries"][0]["evaluation"]["id"], out["dictionaries"][0]["labeling"]["id"]]
    dry = runner.invoke(app, ["catalog", "remove", dict_id, "--dry-run"])
    assert dry.exit_code == 0 and "would remove 3 artifact(s) and 5 lineage edge(s)" in dry.output
    assert all(i in dry.output for i in derived) and labeling.is_dir()
    gone = runner.invoke(app, ["catalog", "remove", dict_id, "--yes"])
    assert gone.exit_code == 0, gone.output
    remaining = {r["id"] for r in json.loads(runner.invoke(app, ["catalog", "list", "--json"]).stdout)}
    assert not remaining & set(derived) and out["cache"]["id"] in remaining and not labeling.exists()
    again = json.loads(runner.invoke(app, ["run", str(path), "--plan", "--json"]).stdout)
    assert [s["reuse"] for s in again] == [True, True, True, False, False, False]
