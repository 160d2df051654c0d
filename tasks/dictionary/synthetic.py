"""Planted ground truth for checking that a dictionary method recovers known features.

`hierarchical_toy` is the setting where matching pursuit is meant to beat a linear encoder (Costa et al. 2025,
"From Flat to Hierarchical"): `n_parents` mutually exclusive parent features, each with `n_children`
mutually exclusive children, plus `n_singletons` independent features. A token holds at most one parent
(with probability `p_parent`) and then exactly one of that parent's children; each singleton is on
independently with probability `p_singleton`. A child's direction leans towards its parent's
(cosine `child_cosine`): children refine their parent, so a linear encoder sees a parent "fire" whenever
any child does, while pursuit can subtract the parent and explain the child from the residual.
Coefficients are uniform in [0.5, 1.5). `bias_adaptation_toy` is the benchmark of (G)BA: features of one
firing rate in samples of two sparsities. `recovery` scores learned directions against any planted set.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from featureatlas.schemas.methods import DictionaryConfig

# Dictionaries draw their initial rows with torch.randn from Generator().manual_seed(cfg.seed); a toy drawing
# its planted directions the same way from the same seed would hand every method the answer at initialisation
# (the first rows coincide exactly). Toys therefore seed their generator with this offset added.
SEED_OFFSET = 1_000_003


class HierarchicalToy(NamedTuple):
    """Planted directions (unit rows, [n, d_in]) by kind, and the samples acts [n_samples, d_in]."""

    parents: Tensor
    children: Tensor  # [n_parents * n_children, d_in]; rows p*n_children .. (p+1)*n_children-1 belong to p
    singletons: Tensor
    acts: Tensor


def _unit(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def hierarchical_toy(
    n_samples: int,
    *,
    d_in: int = 32,
    n_parents: int = 4,
    n_children: int = 4,
    n_singletons: int = 8,
    child_cosine: float = 0.6,
    p_parent: float = 0.8,
    p_singleton: float = 0.1,
    seed: int = 0,
) -> HierarchicalToy:
    """Sample the toy described in the module docstring."""
    g = torch.Generator().manual_seed(SEED_OFFSET + seed)
    parents = _unit(torch.randn(n_parents, d_in, generator=g))
    # child = cos * parent + sin * (a random direction orthogonal to the parent), so <child, parent> = cos.
    noise = torch.randn(n_parents, n_children, d_in, generator=g)
    noise -= (noise * parents[:, None]).sum(-1, keepdim=True) * parents[:, None]
    sin = (1 - child_cosine**2) ** 0.5
    children = _unit(child_cosine * parents[:, None] + sin * _unit(noise)).reshape(-1, d_in)
    singletons = _unit(torch.randn(n_singletons, d_in, generator=g))

    def coefs(shape: tuple[int, ...]) -> Tensor:
        return torch.rand(shape, generator=g) + 0.5

    has_parent = torch.rand(n_samples, generator=g) < p_parent
    parent = torch.randint(n_parents, (n_samples,), generator=g)
    child = parent * n_children + torch.randint(n_children, (n_samples,), generator=g)
    mask = has_parent[:, None].float()
    acts = mask * (coefs((n_samples, 1)) * parents[parent] + coefs((n_samples, 1)) * children[child])
    on = (torch.rand(n_samples, n_singletons, generator=g) < p_singleton).float()
    acts = acts + (on * coefs((n_samples, n_singletons))) @ singletons
    return HierarchicalToy(parents, children, singletons, acts)


class BiasAdaptationToy(NamedTuple):
    """Planted features [n_features, d_in] (unit rows), samples acts [n, d_in], each feature's firing rate."""

    features: Tensor
    acts: Tensor
    true_freq: float


def bias_adaptation_toy(
    n_samples: int,
    *,
    n_features: int = 128,
    d_in: int = 42,
    k_sparse: int = 3,
    k_dense: int = 20,
    seed: int = 0,
) -> BiasAdaptationToy:
    """The bias-adaptation toy of "Taming Polysemanticity": random unit-norm features, half the samples a
    non-negative combination of `k_sparse` of them, half of `k_dense`, coefficients uniform in [0.5, 1.5).

    Every feature fires on (k_sparse + k_dense) / 2 / n_features of the samples (0.09 at the defaults), most
    of them in the dense half, where a linear read-out of one feature carries the interference of the others.
    """
    g = torch.Generator().manual_seed(SEED_OFFSET + seed)
    features = _unit(torch.randn(n_features, d_in, generator=g))
    ranks = torch.rand(n_samples, n_features, generator=g).argsort(-1).argsort(-1)
    n_active = torch.where(torch.arange(n_samples) < n_samples // 2, k_sparse, k_dense).unsqueeze(-1)
    coefs = (torch.rand(n_samples, n_features, generator=g) + 0.5) * (ranks < n_active)
    acts = (coefs @ features)[torch.randperm(n_samples, generator=g)]
    return BiasAdaptationToy(features, acts, (k_sparse + k_dense) / 2 / n_features)


class SparseToy(NamedTuple):
    """Planted features [n_features, d_in] (unit rows), each one's firing rate [n_features], and a sampler."""

    features: Tensor
    freq: Tensor
    coef_range: tuple[float, float]

    def sample(self, n: int, *, seed: int) -> Tensor:
        """acts [n, d_in]: feature i on with probability freq[i], coefficient uniform in coef_range.

        `seed` draws only the samples: the same toy gives a training and a held-out set from two seeds.
        """
        g = torch.Generator().manual_seed(SEED_OFFSET + 7919 * (seed + 1))
        on = torch.rand(n, len(self.freq), generator=g) < self.freq
        lo, hi = self.coef_range
        coefs = (lo + (hi - lo) * torch.rand(n, len(self.freq), generator=g)) * on
        return coefs @ self.features


def sparse_toy(
    *,
    n_features: int,
    d_in: int,
    freq_range: tuple[float, float],
    coef_range: tuple[float, float] = (0.5, 1.5),
    seed: int = 0,
) -> SparseToy:
    """Random unit features, each firing independently at a rate log-uniform in `freq_range` (one rate when
    the range is a point): the planted families of `benchmarks/bench_fidelity.py`."""
    features = planted_directions(n_features, d_in, seed=seed)
    g = torch.Generator().manual_seed(SEED_OFFSET + seed + 1)
    lo, hi = (torch.log(torch.tensor(float(f))) for f in freq_range)
    freq = torch.exp(lo + (hi - lo) * torch.rand(n_features, generator=g))
    return SparseToy(features, freq, coef_range)


def planted_directions(n: int, d_in: int, *, seed: int = 0) -> Tensor:
    """`n` random unit-norm directions [n, d_in], drawn apart from every method's initialisation."""
    return _unit(torch.randn(n, d_in, generator=torch.Generator().manual_seed(SEED_OFFSET + seed)))


def recovery_at_init(cfg: DictionaryConfig, acts: Tensor, true_dirs: Tensor) -> dict[str, float]:
    """`recovery` of `true_dirs` by the dictionary `cfg` builds, initialised from `acts`, before any step.

    A recovery test asserts this is low: a high share means the toy handed the method its answer.
    """
    from featureatlas.tasks.dictionary.registry import build_dictionary

    dictionary = build_dictionary(cfg, acts.shape[1])
    init = getattr(dictionary, "init_from_data", None)
    if init is not None:
        init(acts)
    return recovery(true_dirs, dictionary.decoder_directions().detach())


def recovery(true_dirs: Tensor, learned: Tensor) -> dict[str, float]:
    """Share of true directions [n, d_in] whose best learned direction [m, d_in] has cosine > 0.8 / > 0.9."""
    best = (_unit(true_dirs) @ _unit(learned).T).max(dim=1).values
    return {
        "frr_08": round((best > 0.8).float().mean().item(), 4),
        "frr_09": round((best > 0.9).float().mean().item(), 4),
    }


class PlantedNMF(NamedTuple):
    """A planted semi-NMF problem: F [d_in, r] sparse and signed, acts [n, d_in] = G F^T + noise, G >= 0."""

    F: Tensor
    acts: Tensor


def planted_snmf(
    n: int = 2000, d_in: int = 100, r: int = 8, *, nonzeros: int = 5, noise: float = 0.01, seed: int = 0
) -> PlantedNMF:
    """`nonzeros` random neurons per feature with Gaussian weights; each token uses each feature w.p. 0.3."""
    # Unoffset seeds: semi-NMF draws no random directions (SVD init), and the test's draws stay as they were.
    g = torch.Generator().manual_seed(seed)
    support = torch.rand(d_in, r, generator=g).argsort(0) < nonzeros
    F = torch.randn(d_in, r, generator=g) * support
    G = torch.rand(n, r, generator=g) * (torch.rand(n, r, generator=g) < 0.3)
    return PlantedNMF(F, G @ F.T + noise * torch.randn(n, d_in, generator=g))
