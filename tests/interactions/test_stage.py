"""The interaction stage under a real Prefect test server, catalog and MLflow store; and its input checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
from mlflow.tracking import MlflowClient

from featureatlas.schemas.spec import InteractionsSpec, parse_spec
from featureatlas.tasks.interactions.data import load_table
from featureatlas.tasks.tracking.catalog import open_catalog


def planted_csv(path: Path, n: int = 300) -> Path:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 4))
    y = x[:, 0] * x[:, 1] + x[:, 2] + 0.3 * rng.standard_normal(n)
    pl.DataFrame({"x1": x[:, 0], "x2": x[:, 1], "x3": x[:, 2], "x4": x[:, 3], "y": y}).write_csv(path)
    return path


def test_stage_registers_scores_plots_and_metrics(tmp_path, home, prefect_harness):  # noqa: ARG001
    from prefect import flow

    from featureatlas.tasks.interactions.task import score_interactions
    from featureatlas.tasks.tracking.stage import StageContext

    spec = InteractionsSpec(
        enabled=True,
        table=str(planted_csv(tmp_path / "t.csv")),
        target="y",
        reference="mlp",
        halo_rates=[0.1],
        n_permutations=10,
        n_null=4,
    )

    @flow
    def only_interactions():
        return score_interactions(StageContext(settings=home), spec)

    ref = only_interactions()
    files = {p.name for p in Path(ref.path).iterdir()}
    assert files == {"scores.parquet", "halo.png", "swarm.png"}
    scores = pl.read_parquet(Path(ref.path) / "scores.parquet")
    assert scores.height == ref.n_pairs == 6
    assert (scores["fis_min"] <= scores["fis_ref"]).all() and (scores["fis_ref"] <= scores["fis_max"]).all()
    assert scores["interacts"].dtype == pl.Boolean and (scores["fis_se"] > 0).all()
    assert ref.n_interacting == int(scores["interacts"].sum()) and ref.retrain_note is None
    # the planted x1 * x2 pair interacts most, in the MLP the stage fitted
    assert set(ref.top_pair) == {"x1", "x2"}
    assert [(k, r.id) for k, r in open_catalog(home.catalog).list()] == [("interactions", ref.id)]

    run = MlflowClient(home.mlflow_uri).get_run(ref.mlflow_run_id)
    assert run.data.tags["featureatlas.stage"] == "interactions"
    assert run.data.params["reference"] == "mlp"
    assert run.data.metrics["epsilon"] == pytest.approx(ref.epsilon)

    again = only_interactions()
    assert again.reused and again.id == ref.id


def test_spec_section_is_off_by_default_and_asks_for_a_table():
    assert not InteractionsSpec().enabled
    with pytest.raises(ValueError, match="interactions.table is required"):
        InteractionsSpec(enabled=True)
    assert (
        parse_spec(
            {
                "model": {"path": "m"},
                "hookpoints": ["h"],
                "dictionaries": [{"method": "topk", "d_sae": 64, "k": 4}],
                "interactions": {"enabled": True, "table": "sklearn:wine"},
            }
        ).interactions.table
        == "sklearn:wine"
    )


def test_relative_table_is_read_from_the_spec_folder(tmp_path):
    from featureatlas.schemas.spec import load_spec

    (tmp_path / "spec.yaml").write_text(
        "model: {path: m}\nhookpoints: [h]\ndictionaries: [{method: topk, d_sae: 64, k: 4}]\n"
        "interactions: {enabled: true, table: data/t.csv, target: y}\n"
    )
    assert load_spec(tmp_path / "spec.yaml").interactions.table == str(tmp_path / "data" / "t.csv")


@pytest.mark.parametrize(
    ("frame", "target", "message"),
    [
        ({"a": [1.0, 2.0, 3.0], "y": [0, 1, 0]}, "label", "target column 'label' not found; columns: a, y"),
        ({"a": ["u", "v", "w"], "y": [0, 1, 0]}, "y", r"non-numeric feature columns \['a'\]; encode"),
        ({"a": [1.0, None, 3.0], "y": [0, 1, 0]}, "y", r"missing values .*'a': 1.*impute or drop"),
        (
            {"a": [1.0, 1.0, 1.0], "b": [1.0, 2.0, 3.0], "y": [0, 1, 0]},
            "y",
            r"constant feature columns \['a'\]",
        ),
    ],
)
def test_bad_tables_say_what_to_change(tmp_path, frame, target, message):
    path = tmp_path / "t.parquet"
    pl.DataFrame(frame).write_parquet(path)
    with pytest.raises(ValueError, match=message):
        load_table(str(path), target, "auto", 0.3, 0)


def test_sklearn_datasets_load():
    t = load_table("sklearn:diabetes", None, "auto", 0.25, 0)
    assert t.task == "regression" and t.X_train.shape[1] == 10 and t.loss == "mse"
    assert abs(t.X_train.mean()) < 1e-9  # standardised on the training split
