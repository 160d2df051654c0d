"""The Rashomon set of the input-scaling class `g_m(X) = f*(X * m)` and the cloud of FIS values over it.

Exploration follows the paper ("Exploring the cloud of feature interaction scores in a Rashomon set"): for
each feature `i`, direction `d` in {+1, -1} and budget fraction `b` in 0, 0.1 ... 1, greedy steps on `m_i`
are accepted while the loss increase stays within `b * epsilon`; after a rejection the step shrinks tenfold,
and the search stops after four rejections. All (feature, direction, b) searches advance together, one
batched model evaluation per step. For a pair (i, j), each split `a + b = 1` and each of the four sign
combinations combines the two single-feature scalings into one model; the combined models whose actual loss
stays within `L* + epsilon` form the pair's cloud.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import torch

from featureatlas.tasks.interactions.fis import (
    LossName,
    Predictor,
    model_losses,
    pair_fis,
    single_feature_losses,
)

BUDGETS = torch.linspace(0.0, 1.0, 11)
# sign combinations (direction of m_i, direction of m_j), one per quadrant of the halo plot
SIGNS = ((1, 1), (-1, 1), (-1, -1), (1, -1))


class Exploration(NamedTuple):
    """`scales [p, 2, 11]`: m_i per feature, direction (0: up, 1: down) and budget fraction index."""

    scales: torch.Tensor
    ref_loss: float
    epsilon: float
    steps: int


class PairCloud(NamedTuple):
    """All split/sign models of one pair; `in_set` marks those inside the loss bound."""

    pair: tuple[int, int]
    M: torch.Tensor  # [B, p]
    a: torch.Tensor  # [B] budget fraction spent on feature i
    quadrant: torch.Tensor  # [B] index into SIGNS
    loss: torch.Tensor  # [B]
    fis: torch.Tensor  # [B]
    in_set: torch.Tensor  # [B] bool
    ref_fis: float


def explore(
    f: Predictor,
    X: torch.Tensor,
    y: torch.Tensor,
    loss: LossName,
    rate: float,
    *,
    step: float = 0.1,
    max_rejections: int = 4,
    max_steps: int = 100,
    max_scale: float = 2.0,
) -> Exploration:
    """Greedy per-feature scaling search, all features, directions and budgets advanced in one batch.

    Scalings stay within [0, max_scale]: a step outside counts as a rejection, so a feature the model barely
    uses (whose scaling never costs loss) does not run off to huge or sign-flipped values.
    """
    p = X.shape[1]
    with torch.no_grad():
        ref_loss = float(model_losses(f, X, y, torch.ones(1, p, dtype=X.dtype), loss)[0])
    epsilon = rate * ref_loss
    # one search per (feature, direction, budget): flat index s -> (i, d, b)
    feat = torch.arange(p).repeat_interleave(2 * len(BUDGETS))
    sign = torch.tensor([1.0, -1.0]).repeat_interleave(len(BUDGETS)).repeat(p).to(X.dtype)
    bound = ref_loss + (BUDGETS.repeat(2 * p) * epsilon).to(X.dtype)
    m = torch.ones(len(feat), dtype=X.dtype)
    size = torch.full_like(m, step)
    rejections = torch.zeros(len(feat), dtype=torch.long)
    steps = 0
    while steps < max_steps and bool((rejections < max_rejections).any()):
        active = (rejections < max_rejections).nonzero().squeeze(1)
        cand = m[active] + sign[active] * size[active]
        with torch.no_grad():
            ok = single_feature_losses(f, X, y, feat[active], cand, loss) <= bound[active]
        ok &= (cand >= 0) & (cand <= max_scale)
        m[active[ok]] = cand[ok]
        rejected = active[~ok]
        size[rejected] /= 10
        rejections[rejected] += 1
        steps += 1
    return Exploration(m.reshape(p, 2, len(BUDGETS)), ref_loss, epsilon, steps)


def pair_models(ex: Exploration, pair: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Models of every split `a + b = 1` and sign combination: `M [44, p]`, `a [44]`, `quadrant [44]`."""
    i, j = pair
    p, n_b = ex.scales.shape[0], len(BUDGETS)
    rows, a_vals, quads = [], [], []
    for q, (si, sj) in enumerate(SIGNS):
        for k in range(n_b):
            m = torch.ones(p, dtype=ex.scales.dtype)
            m[i] = ex.scales[i, 0 if si > 0 else 1, k]
            m[j] = ex.scales[j, 0 if sj > 0 else 1, n_b - 1 - k]
            rows.append(m)
            a_vals.append(float(BUDGETS[k]))
            quads.append(q)
    return torch.stack(rows), torch.tensor(a_vals), torch.tensor(quads)


def pair_cloud(
    f: Predictor,
    X: torch.Tensor,
    y: torch.Tensor,
    ex: Exploration,
    pair: tuple[int, int],
    perms: torch.Tensor,
    loss: LossName,
) -> PairCloud:
    """FIS of the pair over its split/sign models and the reference (last row of the batch), in one call."""
    M, a, quad = pair_models(ex, pair)
    ones = torch.ones(1, M.shape[1], dtype=M.dtype)
    with torch.no_grad():
        scores = pair_fis(f, X, y, torch.cat([M, ones]), pair, perms, loss)
    in_set = scores["loss"][:-1] <= ex.ref_loss + ex.epsilon * (1 + 1e-9)
    return PairCloud(
        pair, M, a, quad, scores["loss"][:-1], scores["fis"][:-1], in_set, float(scores["fis"][-1])
    )


def all_pairs(p: int) -> list[tuple[int, int]]:
    return list(itertools.combinations(range(p), 2))


class Multiplicity(NamedTuple):
    """Predictive multiplicity of a classifier over a set of models, on the points of `X`."""

    low: torch.Tensor  # [n] lowest probability of the reference's predicted class over the set
    high: torch.Tensor  # [n] highest
    ambiguity: float  # share of points that some model of the set labels differently from the reference
    discrepancy: float  # largest share of points one model of the set labels differently


def multiplicity(f: Predictor, X: torch.Tensor, M: torch.Tensor) -> Multiplicity:
    """Viable prediction range per point, ambiguity and discrepancy of the scaling models `M [B, p]`."""
    with torch.no_grad():
        ref = f(X)
        P = f((X * M[:, None, :]).reshape(-1, X.shape[1])).reshape(M.shape[0], *ref.shape)
    return multiplicity_of(ref, P)


def multiplicity_of(ref: torch.Tensor, P: torch.Tensor) -> Multiplicity:
    """The same from predictions: reference `[n]` (P(y = 1)) or `[n, C]`, the set's models `[B, n, ...]`."""
    B = P.shape[0]
    if ref.dim() == 1:  # binary: P(y = 1), threshold 0.5
        ref_label, labels = ref >= 0.5, P >= 0.5
        own = torch.where(ref_label, P, 1 - P)
    else:
        ref_label, labels = ref.argmax(-1), P.argmax(-1)
        own = P.gather(-1, ref_label.expand(B, -1).unsqueeze(-1)).squeeze(-1)
    flipped = labels != ref_label  # [B, n]
    return Multiplicity(
        own.min(0).values,
        own.max(0).values,
        float(flipped.any(0).float().mean()),
        float(flipped.float().mean(1).max()),
    )
