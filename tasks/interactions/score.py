"""Score the pairs of a fitted model: each pair's FIS cloud over the Rashomon set, range and reference value.

The set is the input-scaling class, the retraining class (`retrain.py`), or both. With many features the
pairs are first ranked (by the reference's |FIS|, or by the smaller of the two features' importances) and only
the `max_pairs` best are scored over the set, since every pair costs a cloud.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import polars as pl
import torch

from featureatlas.tasks.interactions.fis import LossName, Predictor, importances, model_losses, pair_fis
from featureatlas.tasks.interactions.rashomon import (
    Exploration,
    Multiplicity,
    PairCloud,
    all_pairs,
    explore,
    multiplicity,
    multiplicity_of,
    pair_cloud,
)
from featureatlas.tasks.interactions.retrain import Fit, RetrainedSet, retrain_cloud, retrain_set

Ranking = Literal["reference_fis", "importance"]


class Scores(NamedTuple):
    ref_loss: float
    epsilon: float
    exploration: Exploration | None  # the scaling class's search (None without that class)
    clouds: list[PairCloud]  # scaling class, one per scored pair ([] without that class)
    retrained: RetrainedSet | None
    retrain_clouds: list[PairCloud]  # retraining class, one per scored pair ([] without that class)
    table: pl.DataFrame  # one row per scored pair, most variable first
    multiplicity: Multiplicity | None  # classifiers only


def check_feasible(ex: Exploration, rate: float) -> None:
    """A set holding only the reference says nothing about variation: say how to widen the bound."""
    if ex.epsilon <= 0 or bool((ex.scales == 1).all()):
        raise ValueError(
            f"the loss bound L* + epsilon = {ex.ref_loss:.4g} + {ex.epsilon:.3g} admits no model but the "
            f"reference (no feature scaling fits within it); raise `interactions.rate` (now {rate}), or use "
            "a reference model with a non-zero held-out loss"
        )


def rank_pairs(
    f: Predictor,
    X: torch.Tensor,
    y: torch.Tensor,
    perms: torch.Tensor,
    loss: LossName,
    max_pairs: int | None,
    by: Ranking,
) -> list[tuple[int, int]]:
    """All pairs, or the `max_pairs` with the largest reference |FIS| (or importance), best first."""
    pairs = all_pairs(X.shape[1])
    if max_pairs is None or len(pairs) <= max_pairs:
        return pairs
    ones = torch.ones(1, X.shape[1], dtype=X.dtype)
    with torch.no_grad():
        if by == "reference_fis":
            score = [abs(float(pair_fis(f, X, y, ones, pr, perms, loss)["fis"][0])) for pr in pairs]
        else:
            phi = importances(f, X, y, perms, loss)
            score = [float(torch.minimum(phi[i], phi[j])) for i, j in pairs]
    order = sorted(range(len(pairs)), key=lambda k: -score[k])
    return [pairs[k] for k in order[:max_pairs]]


def _summary(prefix: str, c: PairCloud) -> dict:
    fis = torch.cat([c.fis[c.in_set], torch.tensor([c.ref_fis], dtype=c.fis.dtype)])
    return {
        f"{prefix}fis_min": float(fis.min()),
        f"{prefix}fis_max": float(fis.max()),
        f"{prefix}fis_range": float(fis.max() - fis.min()),
        f"{prefix}n_models": int(c.in_set.sum()) + 1,
    }


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
    *,
    scaling: bool = True,
    retrain: tuple[Fit, int, int] | None = None,
    max_pairs: int | None = None,
    ranking: Ranking = "reference_fis",
) -> Scores:
    """`retrain = (fit, n_train, n_models)` adds the retraining class; `scaling=False` leaves its class out.

    Table columns per pair: `fis_ref`, and per class `fis_min`, `fis_max`, `fis_range`, `n_models` (scaling)
    and `retrain_fis_min`, ... (retraining); both ranges include the reference.
    """
    if not scaling and retrain is None:
        raise ValueError("choose at least one model class: the input-scaling or the retraining class")
    with torch.no_grad():
        ref_loss = float(model_losses(f, X, y, torch.ones(1, X.shape[1], dtype=X.dtype), loss)[0])
    ex = None
    if scaling:
        ex = explore(f, X, y, loss, rate, max_scale=max_scale)
        check_feasible(ex, rate)
    epsilon = rate * ref_loss
    rs = None
    if retrain is not None:
        fit, n_train, n_models = retrain
        rs = retrain_set(fit, n_train, n_models, X, y, loss, ref_loss, epsilon, seed)
    gen = torch.Generator().manual_seed(seed)
    perms = torch.stack([torch.randperm(X.shape[0], generator=gen) for _ in range(n_permutations)])
    pairs = rank_pairs(f, X, y, perms, loss, max_pairs, ranking)
    clouds = [pair_cloud(f, X, y, ex, pair, perms, loss) for pair in pairs] if ex else []
    ref_fis = {}
    if not clouds:
        ones = torch.ones(1, X.shape[1], dtype=X.dtype)
        with torch.no_grad():
            ref_fis = {pr: float(pair_fis(f, X, y, ones, pr, perms, loss)["fis"][0]) for pr in pairs}
    ref_fis |= {c.pair: c.ref_fis for c in clouds}
    r_clouds = [retrain_cloud(rs, X, y, pr, perms, loss, ref_fis[pr]) for pr in pairs] if rs else []
    rows = []
    for k, (i, j) in enumerate(pairs):
        row = {"feature_i": features[i], "feature_j": features[j], "fis_ref": ref_fis[(i, j)]}
        if clouds:
            row |= _summary("", clouds[k])
        if r_clouds:
            row |= _summary("retrain_", r_clouds[k])
        rows.append(row)
    table = pl.DataFrame(rows).sort("fis_range" if clouds else "retrain_fis_range", descending=True)
    mult = None
    if classifier:
        ones = torch.ones(1, X.shape[1], dtype=X.dtype)
        if clouds:
            mult = multiplicity(f, X, torch.cat([torch.cat([c.M[c.in_set] for c in clouds]), ones]))
        else:
            with torch.no_grad():
                mult = multiplicity_of(f(X), torch.stack([g(X) for g in rs.models] + [f(X)]))
    return Scores(ref_loss, epsilon, ex, clouds, rs, r_clouds, table, mult)
