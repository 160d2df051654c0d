"""Score every pair of a fitted model: its FIS cloud over the Rashomon set, range and reference value."""

from __future__ import annotations

from typing import NamedTuple

import polars as pl
import torch

from tasks.interactions.fis import LossName, Predictor
from tasks.interactions.rashomon import (
    Exploration,
    Multiplicity,
    PairCloud,
    all_pairs,
    explore,
    multiplicity,
    pair_cloud,
)


class Scores(NamedTuple):
    exploration: Exploration
    clouds: list[PairCloud]
    table: pl.DataFrame  # one row per pair, most variable first
    multiplicity: Multiplicity | None  # classifiers only


def check_feasible(ex: Exploration, rate: float) -> None:
    """A set holding only the reference says nothing about variation: say how to widen the bound."""
    if ex.epsilon <= 0 or bool((ex.scales == 1).all()):
        raise ValueError(
            f"the loss bound L* + epsilon = {ex.ref_loss:.4g} + {ex.epsilon:.3g} admits no model but the "
            f"reference (no feature scaling fits within it); raise `interactions.rate` (now {rate}), or use "
            "a reference model with a non-zero held-out loss"
        )


def score_pairs(
    f: Predictor,
    X: torch.Tensor,
    y: torch.Tensor,
    features: list[str],
    loss: LossName,
    rate: float,
    n_permutations: int,
    seed: int,
    classifier: bool,
    max_scale: float = 2.0,
) -> Scores:
    ex = explore(f, X, y, loss, rate, max_scale=max_scale)
    check_feasible(ex, rate)
    gen = torch.Generator().manual_seed(seed)
    perms = torch.stack([torch.randperm(X.shape[0], generator=gen) for _ in range(n_permutations)])
    clouds = [pair_cloud(f, X, y, ex, pair, perms, loss) for pair in all_pairs(X.shape[1])]
    rows = []
    for c in clouds:
        fis = torch.cat([c.fis[c.in_set], torch.tensor([c.ref_fis], dtype=c.fis.dtype)])
        rows.append(
            {
                "feature_i": features[c.pair[0]],
                "feature_j": features[c.pair[1]],
                "fis_ref": c.ref_fis,
                "fis_min": float(fis.min()),
                "fis_max": float(fis.max()),
                "fis_range": float(fis.max() - fis.min()),
                "n_models": int(c.in_set.sum()) + 1,
            }
        )
    table = pl.DataFrame(rows).sort("fis_range", descending=True)
    mult = None
    if classifier:
        models = torch.cat(
            [torch.cat([c.M[c.in_set] for c in clouds]), torch.ones(1, X.shape[1], dtype=X.dtype)]
        )
        mult = multiplicity(f, X, models)
    return Scores(ex, clouds, table, mult)
