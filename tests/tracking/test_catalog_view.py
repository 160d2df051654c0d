"""The catalog as one frame: columns, the newest evaluation's figures, status, filters and sorting.

Rows are planted straight into a real SQLite catalog (the frame reads only the registered references), so
every figure in the frame is known beforehand.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import polars as pl
import pytest
from sqlalchemy.orm import Session
from typer.testing import CliRunner

import featureatlas as fa
from featureatlas.flows.cli import app
from featureatlas.schemas.catalog import ROWS
from featureatlas.tasks.tracking.catalog import Catalog
from featureatlas.tasks.tracking.catalog_view import COLUMNS, catalog_frame, list_artifacts

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


@pytest.fixture
def planted(tmp_path, home) -> Catalog:
    """In the test's home: model, corpus, cache; dict-a (k=4, two evaluations, labeled), dict-b (k=8,
    folder gone)."""
    cat = Catalog(home.catalog)
    rows = []

    def add(kind: str, i: str, minute: int, ref: dict, made: bool = True, **columns) -> None:
        folder = tmp_path / i
        if made:
            folder.mkdir()
        created = T0 + timedelta(minutes=minute)
        rows.append(ROWS[kind](id=i, fingerprint=i, uri=str(folder), mlflow_run_id=f"run-{i}", config={},
                               ref=ref, created_at=created, **columns))  # fmt: skip

    add("model", "model-1", 0, {}, source="s", architecture="a", n_layers=2, d_model=16)
    add("corpus", "corpus-1", 1, {}, n_documents=1, n_chars=1)
    add("activation_cache", "cache-1", 2, {"n_tokens": 1000}, model_id="model-1", corpus_id="corpus-1",
        hookpoints=["h"], n_tokens=1000)  # fmt: skip
    for i, k, minute, made in (("dict-a", 4, 3, True), ("dict-b", 8, 4, False)):
        ref = {"hookpoint": "h", "d_in": 16, "d_sae": 64, "cache_id": "cache-1",
               "config": {"method": "topk", "k": k}}  # fmt: skip
        add("dictionary", i, minute, ref, made, cache_id="cache-1", method="topk", hookpoint="h", d_in=16,
            d_sae=64)  # fmt: skip
    for i, minute, fvu in (("eval-old", 5, 0.5), ("eval-new", 6, 0.25)):
        figures = {"fvu": fvu, "l0": 4.0, "ce_loss_score": 0.75, "dead_fraction": 0.125, "n_tokens": 256}
        add("evaluation", i, minute, {"dictionary_id": "dict-a"} | figures, dictionary_id="dict-a",
            metrics=figures)  # fmt: skip
    add("labeling", "labels-a", 7, {"dictionary_id": "dict-a"}, dictionary_id="dict-a", n_features=64)
    with Session(cat.engine) as s, s.begin():
        for row in rows:  # one at a time: the tables have foreign keys but the rows no relationships
            s.add(row)
            s.flush()
    return cat


def test_frame_has_the_columns_and_the_newest_evaluation(planted):
    frame = catalog_frame(planted)
    assert frame.columns == list(COLUMNS)
    assert frame["id"].to_list() == [
        "model-1", "corpus-1", "cache-1", "dict-a", "dict-b", "eval-old", "eval-new", "labels-a"
    ]  # oldest first  # fmt: skip
    a = frame.row(3, named=True)
    assert (a["method"], a["k"], a["d_sae"], a["hookpoint"], a["cache_id"]) == ("topk", 4, 64, "h", "cache-1")
    assert (a["fvu"], a["evaluation_id"], a["status"]) == (0.25, "eval-new", "labeled")
    b = frame.row(4, named=True)
    assert (b["k"], b["fvu"], b["status"]) == (8, None, "missing")
    old = frame.filter(pl.col("id") == "eval-old").row(0, named=True)
    assert (old["fvu"], old["k"], old["dictionary_id"], old["status"]) == (0.5, 4, "dict-a", "ok")
    labels = frame.filter(pl.col("id") == "labels-a").row(0, named=True)
    facts = (labels["method"], labels["k"], labels["fvu"], labels["evaluation_id"])
    assert facts == ("topk", 4, 0.25, "eval-new")  # its dictionary's newest evaluation
    assert frame.filter(pl.col("id") == "cache-1")["n_tokens"].to_list() == [1000]


def test_filters_sorting_and_errors(planted):
    assert list_artifacts(planted, "dictionary", "k > 4")["id"].to_list() == ["dict-b"]
    good = list_artifacts(planted, where=pl.col("fvu") < 0.3)["id"].to_list()
    assert good == ["dict-a", "eval-new", "labels-a"]
    assert list_artifacts(planted, method="relu").height == 0
    assert list_artifacts(planted, hookpoint="h").height == 2 + 2 + 1
    by_fvu = list_artifacts(planted, sort="fvu", descending=True)["fvu"].to_list()
    assert by_fvu[:4] == [0.5, 0.25, 0.25, 0.25] and by_fvu[-1] is None
    with pytest.raises(ValueError, match="unknown kind 'dict'"):
        list_artifacts(planted, "dict")
    with pytest.raises(ValueError, match="is not a condition over the columns.*columns: id, kind"):
        list_artifacts(planted, where="no_such_column > 1")
    with pytest.raises(ValueError, match="cannot sort by 'created'"):
        list_artifacts(planted, sort="created")


def test_the_api_and_the_cli_read_the_same_frame(planted):
    api = fa.catalog().list("dictionary", sort="k", descending=True)
    assert api.equals(list_artifacts(planted, "dictionary", sort="k", descending=True))
    args = ["catalog", "list", "--kind", "dictionary", "--sort", "k", "--desc", "--json"]
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 0, out.output
    listed = json.loads(out.stdout)
    assert [r["id"] for r in listed] == api["id"].to_list()
    assert [r["fvu"] for r in listed] == api["fvu"].to_list() and listed[1]["status"] == "labeled"


def test_the_api_page_names_every_column():
    page = (Path(__file__).resolve().parents[2] / "docs" / "pages" / "api.md").read_text()
    assert [c for c in COLUMNS if f"`{c}`" not in page] == []
