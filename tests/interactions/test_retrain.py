"""The retraining class, the pair cap and the `Layered` fast path, on planted ground truth."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

from featureatlas.tasks.interactions.data import fit_reference, load_table, split_frame
from featureatlas.tasks.interactions.fis import Layered, model_losses, pair_fis, single_feature_losses
from featureatlas.tasks.interactions.retrain import RetrainedSet, retrain_set
from featureatlas.tasks.interactions.score import _multiplicity, rank_pairs, score_pairs


def planted_table(n: int = 1000, p: int = 3, seed: int = 0):
    """y = x1 * x2 + x3 + noise, and `p - 3` irrelevant columns."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, p))
    y = x[:, 0] * x[:, 1] + x[:, 2] + 0.3 * rng.standard_normal(n)
    frame = pl.DataFrame({f"x{i + 1}": x[:, i] for i in range(p)} | {"y": y})
    return split_frame(frame, "y", "planted", "regression", 0.3, seed)


def held_out(t):
    return torch.as_tensor(t.X_test), torch.as_tensor(t.y_test)


def test_every_kept_retrained_model_satisfies_the_bound_and_every_dropped_one_breaks_it():
    t = planted_table(600)
    X, y = held_out(t)
    f = fit_reference("mlp", t, 0)
    ref_loss = float(model_losses(f, X, y, torch.ones(1, 3, dtype=X.dtype), "mse")[0])
    eps = 0.3 * ref_loss  # bootstrap refits see ~63% of the distinct rows: they are a little worse than f*
    rs = retrain_set(
        lambda s, r: fit_reference("mlp", t, s, r), len(t.y_train), 8, X, y, "mse", ref_loss, eps, 0
    )
    assert len(rs.models) == int(rs.kept.sum()) >= 1
    ones = torch.ones(1, 3, dtype=X.dtype)
    # recomputed from the kept models themselves, not read back from the bookkeeping
    kept = torch.tensor([float(model_losses(g, X, y, ones, "mse")[0]) for g in rs.models])
    assert (kept <= ref_loss + eps + 1e-12).all()
    assert (rs.losses[~rs.kept] > ref_loss + eps).all()


def test_no_retrained_model_in_the_bound_says_why():
    t = planted_table(300)
    X, y = held_out(t)
    # a bound below the reference's own loss: no refit can be inside it
    rs = retrain_set(
        lambda s, r: fit_reference("linear", t, s, r), len(t.y_train), 2, X, y, "mse", 0.0, 0.0, 0
    )
    assert rs.empty and rs.models == [] and not rs.kept.any()
    assert "raise `interactions.rate`, raise `interactions.n_retrain`" in rs.reason


def test_empty_retraining_class_keeps_the_scaling_results():
    t = planted_table(500)
    X, y = held_out(t)
    f = fit_reference("mlp", t, 0)
    # a learner whose every refit predicts a constant: far outside the bound of a good MLP
    constant = Layered(
        torch.zeros(1, 3, dtype=torch.float64), torch.zeros(1, dtype=torch.float64), lambda H: H[..., 0]
    )
    fit = lambda s, r: constant  # noqa: E731, ARG005
    scores = score_pairs(f, X, y, t.features, "mse", 0.1, 4, 0, False, retrain=(fit, len(t.y_train), 3))
    assert scores.retrained.empty and "none of the 3 retrained models" in scores.retrained.reason
    assert len(scores.clouds) == 3 and scores.retrain_clouds == []
    assert "fis_range" in scores.table.columns and "retrain_fis_range" not in scores.table.columns
    top = scores.table.row(0, named=True)
    assert (top["feature_i"], top["feature_j"]) == ("x1", "x2")  # the finished scaling scores are all there
    # with no other class to keep, the empty set is the stage's error, with the reason
    with pytest.raises(ValueError, match="none of the 3 retrained models"):
        score_pairs(
            f, X, y, t.features, "mse", 0.1, 4, 0, False, scaling=False, retrain=(fit, len(t.y_train), 3)
        )


def test_multiplicity_counts_the_retrained_models():
    X = torch.tensor([[0.3], [1.0], [-2.0], [0.1]], dtype=torch.float64)
    f = Layered(
        torch.ones(1, 1, dtype=torch.float64),
        torch.zeros(1, dtype=torch.float64),
        lambda H: torch.sigmoid(H[..., 0]),
    )
    flipped = lambda Z: torch.sigmoid(-Z[:, 0])  # noqa: E731  (a refit that relabels every row)
    rs = RetrainedSet([flipped], torch.zeros(1), torch.ones(1, dtype=torch.bool), 0.5, 0.05, None)
    m = _multiplicity(f, X, [], rs)
    assert m.ambiguity == 1.0 and m.discrepancy == 1.0  # every label flips under the refit
    assert _multiplicity(f, X, [], None).ambiguity == 0.0


def test_planted_interaction_is_found_across_the_retrained_set():
    t = planted_table()
    X, y = held_out(t)
    f = fit_reference("mlp", t, 0)
    fit = lambda s, r: fit_reference("mlp", t, s, r)  # noqa: E731
    scores = score_pairs(
        f, X, y, t.features, "mse", 0.2, 4, 0, False, scaling=False, retrain=(fit, len(t.y_train), 6)
    )
    assert scores.clouds == [] and "fis_range" not in scores.table.columns
    by_pair = {(r["feature_i"], r["feature_j"]): r for r in scores.table.iter_rows(named=True)}
    # an exact x1 * x2 on standardised normals has FIS_12 = -2; the MLPs learn most of it
    assert by_pair[("x1", "x2")]["retrain_n_models"] >= 3
    assert by_pair[("x1", "x2")]["retrain_fis_max"] < -0.8
    for pair in [("x1", "x3"), ("x2", "x3")]:
        assert max(abs(by_pair[pair]["retrain_fis_min"]), abs(by_pair[pair]["retrain_fis_max"])) < 0.25
    c12 = next(c for c in scores.retrain_clouds if c.pair == (0, 1))
    assert (c12.fis < -0.8).all()


def test_both_classes_side_by_side():
    t = planted_table(500)
    X, y = held_out(t)
    f = fit_reference("linear", t, 0)
    fit = lambda s, r: fit_reference("linear", t, s, r)  # noqa: E731
    scores = score_pairs(f, X, y, t.features, "mse", 0.1, 2, 0, False, retrain=(fit, len(t.y_train), 4))
    assert {"fis_range", "retrain_fis_range"} <= set(scores.table.columns)
    assert len(scores.clouds) == len(scores.retrain_clouds) == 3


@pytest.mark.parametrize("by", ["reference_fis", "importance"])
def test_pair_cap_keeps_the_planted_pair_first(by):
    t = planted_table(600, p=6)
    X, y = held_out(t)
    f = fit_reference("mlp", t, 0)
    perms = torch.stack([torch.randperm(len(y)) for _ in range(3)])
    pairs = rank_pairs(f, X, y, perms, "mse", 3, by)
    assert len(pairs) == 3
    # by |FIS|: x1 x x2 is the only interacting pair; by importance, the pairs among x1, x2, x3
    assert pairs[0] == (0, 1) if by == "reference_fis" else set(pairs) == {(0, 1), (0, 2), (1, 2)}
    scores = score_pairs(f, X, y, t.features, "mse", 0.1, 3, 0, False, max_pairs=3, ranking=by)
    assert scores.table.height == 3


@pytest.mark.parametrize("reference", ["linear", "mlp"])
@pytest.mark.parametrize("dataset", ["sklearn:wine", "sklearn:breast_cancer", "sklearn:diabetes"])
def test_layered_fast_path_equals_the_generic_one(dataset, reference):
    t = load_table(dataset, None, "auto", 0.3, 0)
    X, y = held_out(t)
    f = fit_reference(reference, t, 0)
    assert isinstance(f, Layered)
    generic = lambda Z: f(Z)  # noqa: E731  (not a Layered: takes the generic paths)
    p = X.shape[1]
    M = 1 + 0.2 * torch.randn(5, p, dtype=torch.float64)
    perms = torch.stack([torch.randperm(len(y)) for _ in range(3)])
    fast = pair_fis(f, X, y, M, (0, 3), perms, t.loss)
    slow = pair_fis(generic, X, y, M, (0, 3), perms, t.loss)
    for key in ("loss", "phi_i", "phi_j", "phi_ij", "fis"):
        assert torch.allclose(fast[key], slow[key], atol=1e-9)
    feat, scale = torch.tensor([0, 2, 1]), torch.tensor([0.5, 1.3, 2.0], dtype=torch.float64)
    M1 = torch.ones(3, p, dtype=torch.float64)
    M1[torch.arange(3), feat] = scale
    assert torch.allclose(
        single_feature_losses(f, X, y, feat, scale, t.loss), model_losses(generic, X, y, M1, t.loss)
    )


def test_linear_reference_predicts_like_scikit_learn():
    from sklearn.linear_model import LogisticRegression

    t = load_table("sklearn:wine", None, "auto", 0.3, 0)
    est = LogisticRegression(max_iter=2000).fit(t.X_train, t.y_train)
    got = fit_reference("linear", t, 0)(torch.as_tensor(t.X_test)).numpy()
    assert np.allclose(got, est.predict_proba(t.X_test), atol=1e-12)
