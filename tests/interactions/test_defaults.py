"""The stage's defaults on planted truth: the planted pair comes first and interacts, an additive truth
yields no interacting pair, and every pair carries its Monte-Carlo error."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
import torch

from featureatlas.schemas.spec import InteractionsSpec
from featureatlas.tasks.interactions.data import fit_reference, split_frame, split_rows
from featureatlas.tasks.interactions.probe import choose_latents
from featureatlas.tasks.interactions.task import build_scores


def table(kind: str, n: int = 700, seed: int = 5):
    """x1 * x2 + x3 ('planted') or x1 + x2 + x3 ('additive'), plus noise and an irrelevant x4."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 4))
    signal = x[:, 0] * x[:, 1] + x[:, 2] if kind == "planted" else x[:, 0] + x[:, 1] + x[:, 2]
    y = signal + 0.3 * rng.standard_normal(n)
    frame = pl.DataFrame({f"x{i + 1}": x[:, i] for i in range(4)} | {"y": y})
    return split_frame(frame, "y", kind, "regression", 0.3, seed)


def run_defaults(tmp_path, kind: str) -> tuple[dict, pl.DataFrame]:
    spec = InteractionsSpec(enabled=True, table=f"{kind}.csv", target="y")  # every other field at its default
    facts = build_scores(spec, tmp_path, table(kind))
    return facts, pl.read_parquet(tmp_path / "scores.parquet")


@pytest.mark.slow
def test_planted_pair_comes_first_and_alone_interacts_at_defaults(tmp_path):
    facts, scores = run_defaults(tmp_path, "planted")
    assert scores.height == 6 and facts["top_pair"] == ["x1", "x2"]
    verdict = {(r["feature_i"], r["feature_j"]): r["interacts"] for r in scores.iter_rows(named=True)}
    assert verdict.pop(("x1", "x2")) and not any(verdict.values())
    assert facts["n_interacting"] == 1
    # the Monte-Carlo error is finite, positive and small next to the planted FIS (-2 for an exact x1 * x2)
    top = scores.row(0, named=True)
    assert 0 < top["fis_se"] < 0.1 * abs(top["fis_ref"]) and top["fis_ref"] < -1.0
    assert all(math.isfinite(v) and v >= 0 for v in scores["fis_se"])
    assert {"halo.png", "swarm.png", "scores.parquet"} <= {p.name for p in tmp_path.iterdir()}


@pytest.mark.slow
def test_no_spurious_pair_on_an_additive_truth_at_defaults(tmp_path):
    facts, scores = run_defaults(tmp_path, "additive")
    assert not scores["interacts"].any() and facts["n_interacting"] == 0
    # the FIS a pair does show (chance correlation of the rows, the MLP's own noise) lies in its null band
    assert ((scores["null_low"] <= scores["fis_ref"]) & (scores["fis_ref"] <= scores["null_high"])).all()


def test_probe_latents_are_chosen_on_the_training_rows_only():
    n, gen = 400, torch.Generator().manual_seed(3)
    train, test = split_rows(n, 0.3, 0)
    y = np.zeros(n, dtype=bool)
    y[np.random.default_rng(1).permutation(n)[: n // 2]] = True
    yt = torch.as_tensor(y, dtype=torch.float64)
    codes = torch.randn(n, 3, dtype=torch.float64, generator=gen)
    codes[torch.as_tensor(test), 0] = yt[torch.as_tensor(test)] * 5  # the label itself, on held-out rows only
    codes[torch.as_tensor(train), 1] += yt[torch.as_tensor(train)]  # a weaker signal, on the training rows
    assert choose_latents(codes, y, train, 1, "digit") == [1]
    # measured on every row, the held-out leak would win
    assert choose_latents(codes, y, np.arange(n), 1, "digit") == [0]


def test_stage_keeps_the_scaling_class_when_no_refit_fits_the_bound(tmp_path, monkeypatch):
    from featureatlas.tasks.interactions import task

    def starved(name, t, seed, rows=None):
        # the real learner, but each bootstrap refit sees only 12 of its rows: all far outside the bound
        return fit_reference(name, t, seed, None if rows is None else rows[:12])

    monkeypatch.setattr(task, "fit_reference", starved)
    spec = InteractionsSpec(
        enabled=True, table="p.csv", target="y", reference="linear", model_class="both", n_retrain=3,
        n_null=3, n_permutations=8, halo_rates=[0.1],
    )  # fmt: skip
    facts = build_scores(spec, tmp_path, table("planted", n=400))
    assert facts["n_retrained"] == 0 and "none of the 3 retrained models" in facts["retrain_note"]
    scores = pl.read_parquet(tmp_path / "scores.parquet")
    # the scaling class's results are all there
    assert scores.height == 6 and "fis_range" in scores.columns and "retrain_fis_range" not in scores.columns
    assert (scores["n_models"] > 1).all() and (scores["fis_se"] > 0).all()
    assert {p.name for p in tmp_path.iterdir()} == {"scores.parquet", "halo.png", "swarm.png"}
