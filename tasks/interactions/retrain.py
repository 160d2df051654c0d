"""The retraining class of the Rashomon set: the reference's learner refitted on bootstrap samples of the
training rows with other seeds, each model kept only if its held-out loss is within `L* + epsilon`.

Where the input-scaling class asks how far one fitted model can be bent, this class asks what the learning
procedure itself would have produced from other draws of the data: the FIS of a pair over the kept models is
its cloud, scored with the same permutations as the reference (so the clouds of both classes compare).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch

from featureatlas.tasks.interactions.fis import LossName, Predictor, model_losses, pair_fis
from featureatlas.tasks.interactions.rashomon import PairCloud

Fit = Callable[[int, np.ndarray], Predictor]
"""`fit(seed, rows)`: the reference's learner fitted on training rows `rows` (a bootstrap sample)."""


class RetrainedSet(NamedTuple):
    models: list[Predictor]  # the kept ones, inside the loss bound
    losses: torch.Tensor  # [R] held-out loss of every retrained model, kept or not
    kept: torch.Tensor  # [R] bool
    ref_loss: float
    epsilon: float
    reason: str | None  # why no refit was kept (None when some were)

    @property
    def empty(self) -> bool:
        return not self.models


def retrain_set(
    fit: Fit,
    n_train: int,
    n_models: int,
    X: torch.Tensor,
    y: torch.Tensor,
    loss: LossName,
    ref_loss: float,
    epsilon: float,
    seed: int,
) -> RetrainedSet:
    """Fit `n_models` models on bootstrap samples (seeds `seed + 1 ...`), keep those within the bound.

    Keeping none is a result, not an error: the set then says why (`reason`), and the caller keeps whatever
    else it scored (the scaling class)."""
    rng = np.random.default_rng(seed)
    ones = torch.ones(1, X.shape[1], dtype=X.dtype)
    models, losses = [], []
    for r in range(n_models):
        g = fit(seed + 1 + r, np.sort(rng.integers(0, n_train, n_train)))
        with torch.no_grad():
            losses.append(float(model_losses(g, X, y, ones, loss)[0]))
        models.append(g)
    L = torch.tensor(losses, dtype=torch.float64)
    bound = ref_loss + epsilon * (1 + 1e-9)
    kept = L <= bound  # noqa: SIM300
    reason = None
    if not bool(kept.any()):
        reason = (
            f"none of the {n_models} retrained models is within the loss bound L* + epsilon = "
            f"{ref_loss:.4g} + {epsilon:.3g} (their held-out losses: {L.min():.4g} to {L.max():.4g}); raise "
            "`interactions.rate`, raise `interactions.n_retrain`, or use `model_class: scaling`"
        )
    models = [g for g, k in zip(models, kept.tolist()) if k]
    return RetrainedSet(models, L, kept, ref_loss, epsilon, reason)


def retrain_cloud(
    rs: RetrainedSet,
    X: torch.Tensor,
    y: torch.Tensor,
    pair: tuple[int, int],
    perms: torch.Tensor,
    loss: LossName,
    ref_fis: float,
    ref_fis_se: float,
) -> PairCloud:
    """FIS of the pair for every kept model, as a `PairCloud` (M: ones, since no model here is a scaling)."""
    ones = torch.ones(1, X.shape[1], dtype=X.dtype)
    with torch.no_grad():
        fis = torch.cat([pair_fis(g, X, y, ones, pair, perms, loss)["fis"] for g in rs.models])
    B = len(rs.models)
    zeros = torch.zeros(B, dtype=X.dtype)
    return PairCloud(
        pair,
        ones.expand(B, -1),
        zeros,
        zeros,
        rs.losses[rs.kept].to(X.dtype),
        fis,
        torch.ones(B, dtype=torch.bool),
        ref_fis,
        ref_fis_se,
    )
