"""The null band of a pair: the FIS that the reference's learner shows on the same rows when the truth is
additive.

A FIS is not zero just because nothing interacts. Permuting `x_i` and `x_j` together keeps their sample
correlation while permuting them one at a time breaks it, so an exactly additive model `w_i x_i + w_j x_j`
under the squared loss gets `FIS_ij ~ 4 w_i w_j corr(x_i, x_j)` from a chance correlation of the held-out
rows alone; a logistic link bends any sum; and a flexible learner fits a little non-additive noise. None of
that is an interaction of the data. So the band asks the learner itself:

1. an additive model is fitted to the training split (`additive_fit`: a cubic spline basis per feature, five
   knots, with ridge or logistic regression on top, so that for a classifier the sum lives in the logit);
2. `n_null` null worlds draw new targets from it, on the *same* rows (regression: its prediction plus
   training residuals drawn with replacement; classification: labels drawn from its probabilities);
3. the reference's learner is refitted on each world's training rows, and each refit's FIS of every scored
   pair is measured on the world's held-out rows with the reference's own permutations.

The band is `mean_null +- z * sqrt(sd_null^2 + se_ref^2)`; a pair `interacts` when its reference FIS lies
outside. Fitting an additive surrogate only (without refits) would miss the learner's own noise, and a band
of the permutation error alone would call every chance correlation an interaction.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch

from featureatlas.tasks.interactions.data import Table
from featureatlas.tasks.interactions.fis import LossName, Predictor, pair_fis

Refit = Callable[[Table, int], Predictor]
"""`refit(table, seed)`: the reference's learner fitted on `table`'s training rows."""


class NullWorld(NamedTuple):
    model: Predictor  # the learner refitted on the world's training targets
    y_test: torch.Tensor  # the world's held-out targets, on the reference's held-out rows


class NullBand(NamedTuple):
    """Per scored pair: the null FIS's mean and spread, the band and the verdict."""

    mean: torch.Tensor  # [P]
    sd: torch.Tensor  # [P]
    low: torch.Tensor  # [P]
    high: torch.Tensor  # [P]
    interacts: torch.Tensor  # [P] bool: the reference FIS lies outside [low, high]


def additive_fit(table: Table):
    """An additive model of the training rows: cubic splines per feature, then ridge or logistic fit."""
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import SplineTransformer

    head = LogisticRegression(max_iter=2000) if table.task == "classification" else Ridge(alpha=1.0)
    return make_pipeline(SplineTransformer(n_knots=5, degree=3), head).fit(table.X_train, table.y_train)


def _draw(gam, table: Table, X: np.ndarray, residuals: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if table.task == "regression":
        return gam.predict(X) + rng.choice(residuals, len(X))
    P = gam.predict_proba(X)  # [n, C], columns in class order 0 .. C-1
    u = rng.random((len(X), 1))
    return (u > P.cumsum(1)).sum(1).clip(max=P.shape[1] - 1).astype(np.float64)


def null_worlds(table: Table, refit: Refit, n_null: int, seed: int) -> list[NullWorld]:
    """`n_null` additive worlds on the table's rows, each with the learner refitted on its targets."""
    gam = additive_fit(table)
    residuals = table.y_train - gam.predict(table.X_train) if table.task == "regression" else np.zeros(1)
    rng = np.random.default_rng([seed, 7])
    n_classes = len(np.unique(table.y_train))
    worlds = []
    for r in range(n_null):
        for _ in range(10):  # a draw that leaves out a class cannot train a classifier of all classes
            y_train = _draw(gam, table, table.X_train, residuals, rng)
            if table.task == "regression" or len(np.unique(y_train)) == n_classes:
                break
        else:
            raise ValueError(
                "the additive null model draws training targets without every class; use more rows or a "
                "smaller `interactions.heldout_fraction`"
            )
        y_test = _draw(gam, table, table.X_test, residuals, rng)
        world = table._replace(y_train=y_train, y_test=y_test)
        worlds.append(NullWorld(refit(world, seed + 10_000 + r), torch.as_tensor(y_test)))
    return worlds


def null_fis(
    worlds: list[NullWorld],
    X: torch.Tensor,
    pairs: list[tuple[int, int]],
    perms: torch.Tensor,
    loss: LossName,
) -> torch.Tensor:
    """FIS of every pair in every null world, with the reference's permutations -> `[R, P]`."""
    ones = torch.ones(1, X.shape[1], dtype=X.dtype)
    with torch.no_grad():
        return torch.tensor(
            [
                [float(pair_fis(w.model, X, w.y_test, ones, pr, perms, loss)["fis"][0]) for pr in pairs]
                for w in worlds
            ],
            dtype=X.dtype,
        )


def null_band(null: torch.Tensor, fis_ref: torch.Tensor, fis_se: torch.Tensor, z: float) -> NullBand:
    """The band `mean +- z * sqrt(sd^2 + se^2)` of `null [R, P]` and whether each `fis_ref [P]` leaves it."""
    if null.shape[0] < 2:
        raise ValueError(
            f"a null band needs at least 2 null models (got {null.shape[0]}); raise `interactions.n_null`"
        )
    mean, sd = null.mean(0), null.std(0)
    half = z * (sd**2 + torch.nan_to_num(fis_se, nan=0.0) ** 2).sqrt()
    low, high = mean - half, mean + half
    return NullBand(mean, sd, low, high, (fis_ref < low) | (fis_ref > high))
