"""Monte-Carlo error of FIS, chunked permutations, nested clouds, and the additive null band."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

from featureatlas.tasks.interactions import fis as fis_module
from featureatlas.tasks.interactions.fis import pair_fis, pair_fis_naive
from featureatlas.tasks.interactions.null import null_band
from featureatlas.tasks.interactions.rashomon import explore, interior_models
from featureatlas.tasks.interactions.score import permutations, score_pairs


def planted(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    X = torch.randn(n, 3, dtype=torch.float64, generator=gen)
    return X, X[:, 0] * X[:, 1] + X[:, 2] + 0.3 * torch.randn(n, dtype=torch.float64, generator=gen)


def product(Z: torch.Tensor) -> torch.Tensor:
    return Z[:, 0] * Z[:, 1] + Z[:, 2]


def test_chunked_permutations_give_the_same_scores(monkeypatch):
    X, y = planted(300, torch.Generator().manual_seed(11))
    M = 1 + 0.2 * torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(12))
    P = permutations(300, 7, 3)
    whole = pair_fis(product, X, y, M, (0, 1), P, "mse")
    monkeypatch.setattr(fis_module, "MEMORY_ELEMENTS", 1)  # one permutation per chunk
    chunked = pair_fis(product, X, y, M, (0, 1), P, "mse")
    for key in whole:
        assert torch.allclose(whole[key], chunked[key])
    assert torch.allclose(whole["fis"], pair_fis_naive(product, X, y, M, (0, 1), P, "mse"))


def test_fis_se_is_the_permutation_spread_of_the_estimate():
    X, y = planted(800, torch.Generator().manual_seed(21))
    ones = torch.ones(1, 3, dtype=torch.float64)
    # the same pair estimated with 30 fresh permutations, 40 times: the spread of the estimate ...
    runs = [pair_fis(product, X, y, ones, (0, 1), permutations(800, 30, s), "mse") for s in range(40)]
    spread = float(torch.stack([r["fis"][0] for r in runs]).std())
    # ... is what each run's own standard error claims (within the sampling error of 40 runs)
    se = float(torch.stack([r["fis_se"][0] for r in runs]).mean())
    assert 0.7 < spread / se < 1.4
    # and it shrinks like 1 / sqrt(K): 120 permutations, half the error
    se_120 = float(pair_fis(product, X, y, ones, (0, 1), permutations(800, 120, 0), "mse")["fis_se"][0])
    assert 0.35 < se_120 / se < 0.7


def test_ranges_nest_as_epsilon_grows():
    X, y = planted(400, torch.Generator().manual_seed(31))
    runs = [score_pairs(product, X, y, ["x1", "x2", "x3"], "mse", r, 8, 0, False) for r in (0.03, 0.1, 0.3)]
    for small, large in zip(runs, runs[1:]):
        # the candidates of the smaller epsilon are among those of the larger one ...
        for pair in [(0, 1), (0, 2), (1, 2)]:
            A, B = interior_models(small.exploration, pair)[0], interior_models(large.exploration, pair)[0]
            assert all(bool((a == B).all(1).any()) for a in A)
        # ... so every pair's range over R(eps1) lies inside its range over R(eps2)
        joined = small.table.join(large.table, on=["feature_i", "feature_j"], suffix="_large")
        assert (joined["fis_min_large"] <= joined["fis_min"] + 1e-12).all()
        assert (joined["fis_max_large"] >= joined["fis_max"] - 1e-12).all()
        assert (joined["n_models_large"] >= joined["n_models"]).all()
    # and the set grows: the planted pair's range widens strictly
    ranges = [float(r.table.filter(pl.col("feature_j") == "x2")["fis_range"][0]) for r in runs]
    assert ranges[0] < ranges[1] < ranges[2]


def test_exploration_of_a_rung_does_not_depend_on_epsilon():
    X, y = planted(300, torch.Generator().manual_seed(41))
    small, large = explore(product, X, y, "mse", 0.1), explore(product, X, y, "mse", 0.3)
    k = len(small.budgets)
    assert torch.equal(small.budgets, large.budgets[:k])
    assert torch.equal(small.scales, large.scales[..., :k])


def test_null_band_by_hand():
    null = torch.tensor([[0.0, 1.0], [0.2, 1.2], [0.4, 1.4]], dtype=torch.float64)  # mean 0.2 / 1.2, sd 0.2
    band = null_band(null, torch.tensor([0.95, 1.3]), torch.tensor([0.0, 0.15]), z=3.0)
    assert torch.allclose(band.mean, torch.tensor([0.2, 1.2], dtype=torch.float64))
    # pair 0: half-width 3 * 0.2 = 0.6 -> [-0.4, 0.8], 0.95 is outside; pair 1: 3 * 0.25 = 0.75, inside
    assert torch.allclose(band.low, torch.tensor([-0.4, 0.45], dtype=torch.float64))
    assert torch.allclose(band.high, torch.tensor([0.8, 1.95], dtype=torch.float64))
    assert band.interacts.tolist() == [True, False]
    with pytest.raises(ValueError, match="n_null"):
        null_band(null[:1], torch.zeros(2), torch.zeros(2), 3.0)


def test_interior_candidates_stay_within_the_planned_budget():
    X, y = planted(300, torch.Generator().manual_seed(51))
    ex = explore(product, X, y, "mse", 0.1)
    M, bi, bj = interior_models(ex, (0, 1))
    assert (bi + bj <= ex.epsilon * (1 + 1e-9)).all()
    assert not bool((M == 1).all(1).any())  # the reference is added once, by the caller
    assert len(np.unique(M.numpy(), axis=0)) == len(M)
    # both features move in all four sign combinations
    assert {(bool(r[0] > 1), bool(r[1] > 1)) for r in M if r[0] != 1 and r[1] != 1} == {
        (True, True),
        (True, False),
        (False, True),
        (False, False),
    }
