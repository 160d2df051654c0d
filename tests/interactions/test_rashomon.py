"""Rashomon-set interaction scores on planted ground truth: y = x1 * x2 + x3, and an additive model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from featureatlas.tasks.interactions.fis import model_losses, pair_fis, pair_fis_naive, permute_columns
from featureatlas.tasks.interactions.plots import halo_points
from featureatlas.tasks.interactions.rashomon import (
    explore,
    halo_ring,
    interior_models,
    multiplicity,
    pair_cloud,
)


def planted(n: int = 800) -> tuple[torch.Tensor, torch.Tensor]:
    X = torch.randn(n, 3, dtype=torch.float64)
    return X, X[:, 0] * X[:, 1] + X[:, 2] + 0.3 * torch.randn(n, dtype=torch.float64)


def product(Z: torch.Tensor) -> torch.Tensor:
    return Z[:, 0] * Z[:, 1] + Z[:, 2]


def additive(Z: torch.Tensor) -> torch.Tensor:
    return Z[:, 0] + 0.5 * Z[:, 1] - Z[:, 2]


def perms(n: int, k: int = 4) -> torch.Tensor:
    return torch.stack([torch.randperm(n) for _ in range(k)])


def test_pair_permutation_moves_both_columns_together():
    Z = torch.arange(12.0).reshape(4, 3)  # row r holds 3r, 3r + 1, 3r + 2
    perm = torch.tensor([2, 0, 3, 1])
    out = permute_columns(Z, [0, 1], perm)
    assert torch.equal(out[:, 0], Z[perm, 0]) and torch.equal(out[:, 1], Z[perm, 1])
    assert torch.equal(out[:, 2], Z[:, 2])
    # each row keeps a pair of values that belonged together: col1 = col0 + 1
    assert torch.equal(out[:, 1], out[:, 0] + 1)


def test_batched_fis_matches_naive_loop():
    X, y = planted(200)
    M = 1 + 0.2 * torch.randn(5, 3, dtype=torch.float64)
    P = perms(200, 3)
    batched = pair_fis(product, X, y, M, (0, 1), P, "mse")["fis"]
    assert torch.allclose(batched, pair_fis_naive(product, X, y, M, (0, 1), P, "mse"))


def test_planted_interaction_is_found_across_the_whole_cloud():
    X, y = planted()
    ex = explore(product, X, y, "mse", 0.1)
    P = perms(X.shape[0])
    c12, c13, c23 = (pair_cloud(product, X, y, ex, p, P, "mse") for p in [(0, 1), (0, 2), (1, 2)])
    # FIS_12 of x1 * x2 on standard normals is -2 (phi_12 = 2, phi_1 = phi_2 = 2), scaled by m1^2 m2^2
    assert c12.in_set.sum() > 10
    assert (c12.fis[c12.in_set] < -1.0).all() and c12.ref_fis < -1.0
    for c in (c13, c23):
        assert c.fis[c.in_set].abs().max() < 0.15 and abs(c.ref_fis) < 0.15


def test_additive_model_has_no_interaction_anywhere():
    X = torch.randn(2000, 3, dtype=torch.float64)
    # whiten: a joint permutation also breaks the sample's chance correlation between features, which the
    # squared loss of an additive model picks up (2 w_i w_j cov(x_i, x_j)); here it is exactly zero
    X = X - X.mean(0)
    X = X @ torch.linalg.inv(torch.linalg.cholesky(X.T @ X / len(X))).T
    y = additive(X) + 0.5 * torch.randn(2000, dtype=torch.float64)
    ex = explore(additive, X, y, "mse", 0.1)
    P = perms(2000, 6)
    for pair in [(0, 1), (0, 2), (1, 2)]:
        c = pair_cloud(additive, X, y, ex, pair, P, "mse")
        # phi_i is about 2 w_i^2 (0.5 to 2 here); what is left is permutation noise (sd about 0.03)
        assert c.fis.abs().max() < 0.1 and abs(c.ref_fis) < 0.1


def test_every_model_in_the_set_satisfies_the_loss_bound():
    X, y = planted(400)
    ex = explore(product, X, y, "mse", 0.1)
    # every single-feature model found by the search sits within its own budget (a rung of the ladder)
    for i in range(3):
        for d in range(2):
            M = torch.ones(len(ex.budgets), 3, dtype=torch.float64)
            M[:, i] = ex.scales[i, d]
            assert (model_losses(product, X, y, M, "mse") <= ex.ref_loss + ex.budgets + 1e-12).all()
    c = pair_cloud(product, X, y, ex, (0, 2), perms(400), "mse")
    M, _, _ = interior_models(ex, (0, 2))
    recomputed = model_losses(product, X, y, M[c.in_set], "mse")
    assert (recomputed <= ex.ref_loss + ex.epsilon + 1e-12).all()
    # the interior is sampled, not only the boundary: many kept models cost well under epsilon
    assert (recomputed - ex.ref_loss < ex.epsilon / 2).float().mean() > 0.3
    assert (c.budget_i + c.budget_j <= ex.epsilon * (1 + 1e-9)).all()


def test_halo_points_of_an_additive_model_lie_on_the_circle():
    # independent features, and the exact model as reference: loss increases add up, so a + b = 1 gives eps
    X = torch.randn(4000, 2, dtype=torch.float64)
    f = lambda Z: Z[:, 0] + Z[:, 1]  # noqa: E731
    y = f(X) + torch.randn(4000, dtype=torch.float64)
    ring = halo_ring(f, X, y, "mse", 0.1, (0, 1))
    x, yy, below = halo_points(ring)
    assert np.allclose(np.hypot(x, yy), ring.epsilon, rtol=0.08) and not below.any()


def test_multiplicity_of_a_classifier():
    X = torch.tensor([[0.1], [1.0], [-2.0]], dtype=torch.float64)
    f = lambda Z: torch.sigmoid(Z[:, 0])  # noqa: E731
    M = torch.tensor([[1.0], [-1.0]], dtype=torch.float64)  # the second model flips every label
    m = multiplicity(f, X, M)
    assert m.ambiguity == 1.0 and m.discrepancy == 1.0
    assert (m.low < 0.5).all() and (m.high >= 0.5).all()


def test_empty_set_says_what_to_change():
    from featureatlas.tasks.interactions.score import score_pairs

    X = torch.randn(100, 3, dtype=torch.float64)
    y = X @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + torch.randn(100, dtype=torch.float64)
    w = torch.linalg.lstsq(X, y.unsqueeze(1)).solution.squeeze(1)
    # least squares on these very rows: every scaling costs loss, more than a bound of 1e-12 * L* allows
    with pytest.raises(ValueError, match="raise `interactions.rate`"):
        score_pairs(lambda Z: Z @ w, X, y, ["a", "b", "c"], "mse", 1e-12, 1, 0, False)
