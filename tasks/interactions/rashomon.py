"""The Rashomon set of the input-scaling class `g_m(X) = f*(X * m)` and the cloud of FIS values over it.

Exploration follows the paper ("Exploring the cloud of feature interaction scores in a Rashomon set"): for
each feature `i`, direction `d` in {+1, -1} and loss budget `b`, greedy steps on `m_i` are accepted while the
loss increase stays within `b`; after a rejection the step shrinks tenfold, and the search stops after four
rejections. All (feature, direction, budget) searches advance together, one batched model evaluation per step.

The cloud of a pair samples the *interior* of the set, not only its boundary. The budgets form a ladder fixed
relative to L* (`LADDER`: 10^-3 ... 1 times L*, three rungs a decade), so the single-feature scalings found
for a rung do not depend on epsilon. The candidates of a pair are all combinations of a rung for `m_i` and a
rung (or none) for `m_j` whose planned increases add up to at most epsilon, in each of the four sign
combinations (about 170 models at rate 0.1); those whose actual loss stays within `L* + epsilon` form the
cloud. (The paper's reference code samples sub-boundaries 0.2 ... 1.0 of epsilon, 180 models a pair, for the
same reason.) Since the candidates of a smaller epsilon
are a subset of those of a larger one, and the bound only loosens, the clouds nest: R(eps1) inside R(eps2)
gives FIS ranges inside one another, as the set's definition says they must be. Combining two scalings that
each sit at the boundary (the halo's models) lands on L* + epsilon only when the pair does not interact, so
a cloud of boundary models alone loses about half of them by chance and its range jumps around with epsilon.

The halo (`halo_ring`) keeps the paper's boundary models: splits `a + b = 1` of the budget epsilon.
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
"""The halo's splits: share `a` of epsilon on feature i, `1 - a` on feature j."""
LADDER = 10 ** (torch.arange(-9, 1, dtype=torch.float64) / 3)
"""Loss budgets of the interior sample, as fractions of L* (fixed, so that clouds nest across epsilon)."""
# sign combinations (direction of m_i, direction of m_j), one per quadrant of the halo plot
SIGNS = ((1, 1), (-1, 1), (-1, -1), (1, -1))
_TOL = 1e-9


class Exploration(NamedTuple):
    """`scales [p, 2, L]`: m_i per feature, direction (0: up, 1: down) and budget; `budgets [L]` the loss
    increases allowed (absolute, not fractions)."""

    scales: torch.Tensor
    budgets: torch.Tensor
    ref_loss: float
    epsilon: float
    steps: int


class PairCloud(NamedTuple):
    """The sampled models of one pair; `in_set` marks those inside the loss bound."""

    pair: tuple[int, int]
    M: torch.Tensor  # [B, p]
    budget_i: torch.Tensor  # [B] planned loss increase from m_i alone
    budget_j: torch.Tensor  # [B]
    loss: torch.Tensor  # [B]
    fis: torch.Tensor  # [B]
    in_set: torch.Tensor  # [B] bool
    ref_fis: float
    ref_fis_se: float  # Monte-Carlo standard error of ref_fis over the permutations


class HaloRing(NamedTuple):
    """The halo's boundary models of one pair at one epsilon: split `a` (share on i), quadrant, loss."""

    epsilon: float
    ref_loss: float
    a: torch.Tensor  # [44]
    quadrant: torch.Tensor  # [44] index into SIGNS
    loss: torch.Tensor  # [44]


def reference_loss(f: Predictor, X: torch.Tensor, y: torch.Tensor, loss: LossName) -> float:
    with torch.no_grad():
        return float(model_losses(f, X, y, torch.ones(1, X.shape[1], dtype=X.dtype), loss)[0])


def explore(
    f: Predictor,
    X: torch.Tensor,
    y: torch.Tensor,
    loss: LossName,
    rate: float,
    budgets: torch.Tensor | None = None,
    *,
    step: float = 0.1,
    max_rejections: int = 4,
    max_steps: int = 100,
    max_scale: float = 2.0,
) -> Exploration:
    """Greedy per-feature scaling search, all features, directions and budgets advanced in one batch.

    `budgets`: the loss increases to search for, as fractions of L*; default the `LADDER` rungs up to
    `rate` (the interior sample). Scalings stay within [0, max_scale]: a step outside counts as a rejection,
    so a feature the model barely uses (whose scaling never costs loss) does not run off to huge or
    sign-flipped values.
    """
    p = X.shape[1]
    ref_loss = reference_loss(f, X, y, loss)
    epsilon = rate * ref_loss
    if budgets is None:
        # below the ladder's first rung, the bound itself is the only budget (the set along the axes)
        budgets = LADDER[rate * (1 + _TOL) >= LADDER] if rate >= LADDER[0] else torch.tensor([rate])
    budgets = budgets.to(X.dtype) * ref_loss
    n_b = len(budgets)
    # one search per (feature, direction, budget): flat index s -> (i, d, b)
    feat = torch.arange(p).repeat_interleave(2 * n_b)
    sign = torch.tensor([1.0, -1.0]).repeat_interleave(n_b).repeat(p).to(X.dtype)
    bound = ref_loss + budgets.repeat(2 * p)
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
    return Exploration(m.reshape(p, 2, n_b), budgets, ref_loss, epsilon, steps)


def interior_models(
    ex: Exploration, pair: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Candidates of the pair: rung (or none) per feature, planned total within epsilon, four sign
    combinations, duplicates removed (the reference, m = 1, left out). -> `M [B, p]`, `b_i [B]`, `b_j [B]`."""
    i, j = pair
    p, dtype = ex.scales.shape[0], ex.scales.dtype
    # level 0: the feature left alone (m = 1, no budget); level k > 0: rung k - 1
    levels = torch.cat([torch.zeros(1, dtype=dtype), ex.budgets])
    ki, kj = torch.meshgrid(torch.arange(len(levels)), torch.arange(len(levels)), indexing="ij")
    ki, kj = ki.flatten(), kj.flatten()
    fits = (levels[ki] + levels[kj] <= ex.epsilon * (1 + _TOL)) & ((ki > 0) | (kj > 0))
    ki, kj = ki[fits], kj[fits]
    rows, bi, bj = [], [], []
    for si, sj in SIGNS:
        mi = torch.cat([torch.ones(1, dtype=dtype), ex.scales[i, 0 if si > 0 else 1]])
        mj = torch.cat([torch.ones(1, dtype=dtype), ex.scales[j, 0 if sj > 0 else 1]])
        M = torch.ones(len(ki), p, dtype=dtype)
        M[:, i], M[:, j] = mi[ki], mj[kj]
        rows.append(M)
        bi.append(levels[ki])
        bj.append(levels[kj])
    M, bi, bj = torch.cat(rows), torch.cat(bi), torch.cat(bj)
    # a rung that reaches max_scale (or 0) at once repeats; so does a pair with one feature left alone
    _, first = _unique_rows(M)
    keep = first[(M[first] != 1).any(1)]
    return M[keep], bi[keep], bj[keep]


def _unique_rows(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct rows of `M` and the index of the first occurrence of each, in order of appearance."""
    uniq, inverse = torch.unique(M, dim=0, return_inverse=True)
    first = torch.full((len(uniq),), len(M), dtype=torch.long)
    first.scatter_reduce_(0, inverse, torch.arange(len(M)), reduce="amin")
    return uniq, first.sort().values


def pair_cloud(
    f: Predictor,
    X: torch.Tensor,
    y: torch.Tensor,
    ex: Exploration,
    pair: tuple[int, int],
    perms: torch.Tensor,
    loss: LossName,
) -> PairCloud:
    """FIS of the pair over its interior candidates and the reference (last row of the batch)."""
    M, bi, bj = interior_models(ex, pair)
    ones = torch.ones(1, M.shape[1], dtype=M.dtype)
    with torch.no_grad():
        scores = pair_fis(f, X, y, torch.cat([M, ones]), pair, perms, loss)
    in_set = scores["loss"][:-1] <= ex.ref_loss + ex.epsilon * (1 + _TOL)
    return PairCloud(
        pair,
        M,
        bi,
        bj,
        scores["loss"][:-1],
        scores["fis"][:-1],
        in_set,
        float(scores["fis"][-1]),
        float(scores["fis_se"][-1]),
    )


def pair_models(ex: Exploration, pair: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The halo's models, every split `a + b = 1` and sign combination: `M [44, p]`, `a [44]`,
    `quadrant [44]`. `ex` must be explored with `budgets=BUDGETS * rate` (the splits of epsilon)."""
    i, j = pair
    p, n_b = ex.scales.shape[0], len(BUDGETS)
    if ex.scales.shape[2] != n_b:
        raise ValueError(
            f"the halo needs an exploration of the {n_b} splits of epsilon (budgets=BUDGETS * rate)"
        )
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


def halo_ring(
    f: Predictor,
    X: torch.Tensor,
    y: torch.Tensor,
    loss: LossName,
    rate: float,
    pair: tuple[int, int],
    max_scale: float = 2.0,
) -> HaloRing:
    """The boundary models of the pair at `rate` and their actual losses (one batched evaluation)."""
    ex = explore(f, X, y, loss, rate, BUDGETS.to(X.dtype) * rate, max_scale=max_scale)
    M, a, quad = pair_models(ex, pair)
    with torch.no_grad():
        losses = model_losses(f, X, y, M, loss)
    return HaloRing(ex.epsilon, ex.ref_loss, a, quad, losses)


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
