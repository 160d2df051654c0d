"""Semi-NMF: the update and the sparsification worked by hand, planted recovery with a monotone loss, early
stopping, NNLS encoding, persistence and spec validation."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from featureatlas.schemas.methods import SemiNMFConfig
from featureatlas.schemas.spec import parse_spec
from featureatlas.tasks.dictionary import load_dictionary, train_dictionary
from featureatlas.tasks.dictionary.snmf import SemiNMF, _init_G, multiplicative_update, sparsify_columns
from featureatlas.tasks.dictionary.synthetic import PlantedNMF, planted_snmf


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_multiplicative_update_hand_worked():
    # P = (2, -1), Q = [[1, .5], [.5, 1]] (no negative part), G = (1, 1):
    #   numer = P+ + G Q- = (2, 0); denom = P- + G Q+ = (0, 1) + (1.5, 1.5) = (1.5, 2.5)
    #   G <- (1 * sqrt(2 / 1.5), 1 * sqrt(0 / 2.5)) = (1.1547, 0).
    G = multiplicative_update(
        torch.ones(1, 2), torch.tensor([[2.0, -1.0]]), torch.tensor([[1.0, 0.5], [0.5, 1]])
    )
    torch.testing.assert_close(G, torch.tensor([[(2 / 1.5) ** 0.5, 0.0]]))


def test_sparsify_keeps_the_largest_magnitudes_per_column():
    F = torch.tensor([[3.0, -1.0], [-4.0, 0.5], [1.0, 2.0]])
    # share 0.34 of 3 rows -> ceil(1.02) = 2 kept per column: (3, -4) and (-1, 2).
    torch.testing.assert_close(
        sparsify_columns(F, 0.34), torch.tensor([[3.0, -1.0], [-4.0, 0.0], [0.0, 2.0]])
    )
    assert torch.equal(sparsify_columns(F, 1.0), F)


def plant_nmf(n: int = 2000, d_in: int = 100, r: int = 8, seed: int = 0) -> PlantedNMF:
    """5 neurons per feature (5%-sparse signed F), G 30% dense, noise 0.01."""
    return planted_snmf(n, d_in, r, nonzeros=5, seed=seed)


def fit_planted(seed: int, **overrides) -> tuple[PlantedNMF, object, list[float]]:
    truth = plant_nmf(seed=seed)
    losses: list[float] = []
    cfg = SemiNMFConfig(
        **({"d_sae": 8, "sparsity": 0.05, "max_iters": 300, "log_every": 1, "batch_size": 500} | overrides)
    )
    result = train_dictionary(cfg, truth.acts, on_metrics=lambda m, _: losses.append(m["loss"]))
    return truth, result, losses


def min_match(truth: PlantedNMF, snmf) -> float:
    """The worst true column's best cosine with a learned one."""
    true_dirs = truth.F / truth.F.norm(dim=0)
    return (true_dirs.T @ snmf.decoder_directions().T).max(dim=1).values.min().item()


def monotone(losses: list[float]) -> bool:
    return all(b <= a + 1e-6 for a, b in zip(losses, losses[1:]))


@pytest.mark.slow
def test_planted_recovery_is_reliable_across_draws():
    # Draws 0-5 of the planted problem. As first built (sparsify from the first pass, plain LS-then-truncate
    # F step) this matched every column (min cosine > 0.99) on draws 2 and 4 only, and the loss rose on 2 of
    # the 6. Unsparsified init passes let G separate the features before supports are chosen and the IHT
    # fallback makes every pass a descent step: now draws 0, 2, 3 and 4 match (1 and 5 still do not).
    matched = 0
    for seed in range(6):
        truth, result, losses = fit_planted(seed)
        assert monotone(losses), f"draw {seed}: the loss rose"
        matched += min_match(truth, result.dictionary) > 0.99
    assert matched >= 4


def test_recovers_planted_factorisation_with_monotone_loss(tmp_path):
    truth, result, losses = fit_planted(2)
    assert monotone(losses)
    assert losses[-1] < 0.01 < losses[0]
    snmf = result.dictionary
    assert min_match(truth, snmf) > 0.999
    assert ((snmf.W_dec != 0).sum(-1) == 5).all()  # 5% of 100 neurons per feature

    x = truth.acts[:200]
    with torch.no_grad():
        codes = snmf.encode(x)
        fvu = ((snmf.decode(codes) - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert (codes >= 0).all() and fvu.item() < 0.01

    snmf.save(tmp_path / "snmf")
    loaded = load_dictionary(tmp_path / "snmf")
    assert type(loaded) is SemiNMF and loaded.cfg == snmf.cfg
    with torch.no_grad():
        assert torch.equal(loaded.encode(x), codes)


def test_fallback_step_never_raises_the_loss():
    # Without init passes, draw 1 is one where truncated least squares proposes worse supports: with the plain
    # LS-then-truncate step the loss rises on 2 of these 60 passes. With the fallback every pass descends.
    _, _, losses = fit_planted(1, init_passes=0, max_iters=60)
    assert len(losses) > 5 and monotone(losses)


def test_patience_stops_early_and_keeps_the_best_iterate():
    calls: list[int] = []
    cfg = SemiNMFConfig(d_sae=8, sparsity=0.05, max_iters=500, patience=3, tol=1e-2, log_every=1000)
    result = train_dictionary(cfg, plant_nmf(n=500).acts, on_metrics=lambda _, step: calls.append(step))
    assert result.steps < 500 and calls == [result.steps]  # the stopping pass is always reported
    assert result.final_metrics["loss"] <= min(0.05, result.final_metrics["fvu"])


def test_spec_accepts_snmf():
    spec = parse_spec({"model": {"path": "m"}, "hookpoints": ["h"], "dictionaries": [{"method": "snmf"}]})
    assert spec.dictionaries[0].init == "svd"


def _one_feature_per_token(n: int = 600, d_in: int = 40, r: int = 4) -> tuple[Tensor, Tensor, Tensor]:
    """Tokens that each use one planted feature (label), at magnitude 0.5-1.5, plus noise 0.01."""
    g = torch.Generator().manual_seed(0)
    F = torch.randn(d_in, r, generator=g) * (torch.rand(d_in, r, generator=g).argsort(0) < 4)
    labels = torch.arange(n) % r
    magnitude = 0.5 + torch.rand(n, generator=g)
    acts = magnitude[:, None] * F.T[labels] + 0.01 * torch.randn(n, d_in, generator=g)
    return acts, labels, F


def test_kmeans_start_is_the_cluster_indicators_plus_0_2():
    acts, labels, _ = _one_feature_per_token()
    cfg = SemiNMFConfig(d_sae=4, init="kmeans", batch_size=128)
    G = _init_G(cfg, acts, 128, 1.0)
    assert torch.allclose(G.unique(), torch.tensor([0.2, 1.2]))
    assert torch.allclose(G.sum(1), torch.full((600,), 1.0 + 4 * 0.2))
    found = G.argmax(1)
    # the clusters are the planted groups, up to renaming: each found cluster holds one true label
    pairs = set(zip(found.tolist(), labels.tolist()))
    assert len(pairs) == 4 and len({f for f, _ in pairs}) == 4


def test_kmeans_start_recovers_single_feature_tokens_and_refuses_too_few_tokens():
    acts, _, F = _one_feature_per_token()
    cfg = SemiNMFConfig(d_sae=4, init="kmeans", sparsity=0.1, batch_size=128, max_iters=50)
    snmf = train_dictionary(cfg, acts).dictionary
    cos = (F / F.norm(dim=0)).T @ snmf.decoder_directions().T
    assert cos.max(dim=1).values.min() > 0.99
    with pytest.raises(ValueError, match="at least d_sae = 4 tokens"):
        train_dictionary(cfg, acts[:3])
