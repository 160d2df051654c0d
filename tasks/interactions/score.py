"""Score the pairs of a fitted model: each pair's FIS cloud over the Rashomon set, range, reference value,
its Monte-Carlo error and its null band.

The set is the input-scaling class, the retraining class (`retrain.py`), or both. With many features the
pairs are first ranked (by the reference's |FIS|, or by the smaller of the two features' importances) and only
the `max_pairs` best are scored over the set, since every pair costs a cloud. Given null worlds (`null.py`),
each pair also gets the band of FIS an additive truth would show and the verdict `interacts`; the table lists
the pairs that interact first, then the most variable.
"""

from __future__ import annotations

import logging
from typing import Literal, NamedTuple

import polars as pl
import torch

from featureatlas.tasks.interactions.fis import LossName, Predictor, importances, pair_fis
from featureatlas.tasks.interactions.null import NullBand, NullWorld, null_band, null_fis
from featureatlas.tasks.interactions.rashomon import (
    Exploration,
    Multiplicity,
    PairCloud,
    all_pairs,
    explore,
    multiplicity_of,
    pair_cloud,
    reference_loss,
)
from featureatlas.tasks.interactions.retrain import Fit, RetrainedSet, retrain_cloud, retrain_set

Ranking = Literal["reference_fis", "importance"]
log = logging.getLogger(__name__)


class Scores(NamedTuple):
    ref_loss: float
    epsilon: float
    exploration: Exploration | None  # the scaling class's search (None without that class)
    clouds: list[PairCloud]  # scaling class, one per scored pair ([] without that class)
    retrained: RetrainedSet | None  # its `reason` says why it is empty, when it is
    retrain_clouds: list[PairCloud]  # retraining class, one per scored pair ([] when empty or not asked)
    table: pl.DataFrame  # one row per scored pair: interacting first, then most variable
    multiplicity: Multiplicity | None  # classifiers only: over every kept model of both classes
    null: NullBand | None  # per scored pair, in the order of `clouds` (not of `table`)
    pairs: list[tuple[int, int]]  # the scored pairs, in the order of `clouds`


def check_feasible(ex: Exploration, rate: float) -> None:
    """A set holding only the reference says nothing about variation: say how to widen the bound."""
    if ex.epsilon <= 0 or len(ex.budgets) == 0 or bool((ex.scales == 1).all()):
        raise ValueError(
            f"the loss bound L* + epsilon = {ex.ref_loss:.4g} + {ex.epsilon:.3g} admits no model but the "
            f"reference (no feature scaling fits within it); raise `interactions.rate` (now {rate}), or use "
            "a reference model with a non-zero held-out loss"
        )


def permutations(n: int, k: int, seed: int) -> torch.Tensor:
    """`k` row permutations of `n` rows `[k, n]`, shared by every score (common random numbers)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(n, generator=gen) for _ in range(k)])


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


def _multiplicity(
    f: Predictor, X: torch.Tensor, clouds: list[PairCloud], rs: RetrainedSet | None
) -> Multiplicity:
    """Over the reference, every scaling model inside the bound and every kept refit."""
    with torch.no_grad():
        ref = f(X)
        preds = [ref[None]]
        if clouds:
            M = torch.unique(torch.cat([c.M[c.in_set] for c in clouds]), dim=0)
            preds.append(f((X * M[:, None, :]).reshape(-1, X.shape[1])).reshape(M.shape[0], *ref.shape))
        if rs is not None and rs.models:
            preds.append(torch.stack([g(X) for g in rs.models]))
    return multiplicity_of(ref, torch.cat(preds))


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
    null_worlds: list[NullWorld] | None = None,
    null_z: float = 4.0,
) -> Scores:
    """`retrain = (fit, n_train, n_models)` adds the retraining class; `scaling=False` leaves its class out.

    Table columns per pair: `fis_ref`, `fis_se` (its Monte-Carlo standard error); with `null_worlds`
    `null_fis`, `null_low`, `null_high` and `interacts`; per class `fis_min`, `fis_max`, `fis_range`,
    `n_models` (scaling) and `retrain_fis_min`, ... (retraining); both ranges include the reference.
    """
    if not scaling and retrain is None:
        raise ValueError("choose at least one model class: the input-scaling or the retraining class")
    ref_loss = reference_loss(f, X, y, loss)
    ex = None
    if scaling:
        ex = explore(f, X, y, loss, rate, max_scale=max_scale)
        check_feasible(ex, rate)
    epsilon = rate * ref_loss
    rs = None
    if retrain is not None:
        fit, n_train, n_models = retrain
        rs = retrain_set(fit, n_train, n_models, X, y, loss, ref_loss, epsilon, seed)
        if rs.empty and not scaling:
            raise ValueError(rs.reason)
        if rs.empty:
            log.warning("retraining class empty, scaling class kept: %s", rs.reason)
    perms = permutations(X.shape[0], n_permutations, seed)
    pairs = rank_pairs(f, X, y, perms, loss, max_pairs, ranking)
    clouds = [pair_cloud(f, X, y, ex, pair, perms, loss) for pair in pairs] if ex else []
    if clouds:
        ref = {c.pair: (c.ref_fis, c.ref_fis_se) for c in clouds}
    else:
        ones = torch.ones(1, X.shape[1], dtype=X.dtype)
        with torch.no_grad():
            out = {pr: pair_fis(f, X, y, ones, pr, perms, loss) for pr in pairs}
        ref = {pr: (float(o["fis"][0]), float(o["fis_se"][0])) for pr, o in out.items()}
    r_clouds = (
        [retrain_cloud(rs, X, y, pr, perms, loss, *ref[pr]) for pr in pairs] if rs and rs.models else []
    )
    band = None
    if null_worlds:
        fis_ref = torch.tensor([ref[pr][0] for pr in pairs], dtype=X.dtype)
        fis_se = torch.tensor([ref[pr][1] for pr in pairs], dtype=X.dtype)
        band = null_band(null_fis(null_worlds, X, pairs, perms, loss), fis_ref, fis_se, null_z)
    rows = []
    for k, (i, j) in enumerate(pairs):
        row = {"feature_i": features[i], "feature_j": features[j], "fis_ref": ref[(i, j)][0]}
        row["fis_se"] = ref[(i, j)][1]
        if band is not None:
            row |= {
                "null_fis": float(band.mean[k]),
                "null_low": float(band.low[k]),
                "null_high": float(band.high[k]),
                "interacts": bool(band.interacts[k]),
            }
        if clouds:
            row |= _summary("", clouds[k])
        if r_clouds:
            row |= _summary("retrain_", r_clouds[k])
        rows.append(row)
    by = ["interacts"] if band is not None else []
    by.append("fis_range" if clouds else "retrain_fis_range")
    table = pl.DataFrame(rows).sort(by, descending=True)
    mult = _multiplicity(f, X, clouds, rs) if classifier else None
    return Scores(ref_loss, epsilon, ex, clouds, rs, r_clouds, table, mult, band, pairs)
