"""Semi-NMF: the update and the sparsification worked by hand, planted recovery with a monotone loss, early
stopping, NNLS encoding, persistence and spec validation."""

from __future__ import annotations

import pytest
import torch

from schemas.methods import SemiNMFConfig
from schemas.spec import parse_spec
from tasks.dictionary import load_dictionary, train_dictionary
from tasks.dictionary.snmf import SemiNMF, multiplicative_update, sparsify_columns
from tasks.dictionary.synthetic import PlantedNMF, planted_snmf


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


def test_recovers_planted_factorisation_with_monotone_loss(tmp_path):
    # Not every draw recovers: over planted seeds 0-5, SVD-initialised semi-NMF matched every column
    # (min cosine > 0.999) on seeds 2 and 4 and fell into local optima elsewhere (min cosine 0.16-0.97).
    # Seed 2 is a draw where the algorithm as specified works: this checks the mechanics, not reliability.
    truth = plant_nmf(seed=2)
    losses: list[float] = []
    cfg = SemiNMFConfig(d_sae=8, sparsity=0.05, init="svd", max_iters=300, log_every=1, batch_size=500)
    result = train_dictionary(cfg, truth.acts, on_metrics=lambda m, _: losses.append(m["loss"]))
    assert all(b <= a + 1e-6 for a, b in zip(losses, losses[1:]))
    assert losses[-1] < 0.01 < losses[0]
    snmf = result.dictionary
    true_dirs = truth.F / truth.F.norm(dim=0)
    best = (true_dirs.T @ snmf.decoder_directions().T).max(dim=1).values
    assert best.min().item() > 0.999
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


def test_patience_stops_early_and_keeps_the_best_iterate():
    calls: list[int] = []
    cfg = SemiNMFConfig(d_sae=8, sparsity=0.05, max_iters=500, patience=3, tol=1e-2, log_every=1000)
    result = train_dictionary(cfg, plant_nmf(n=500).acts, on_metrics=lambda _, step: calls.append(step))
    assert result.steps < 500 and calls == [result.steps]  # the stopping pass is always reported
    assert result.final_metrics["loss"] <= min(0.05, result.final_metrics["fvu"])


def test_spec_accepts_snmf():
    spec = parse_spec({"model": {"path": "m"}, "hookpoints": ["h"], "dictionaries": [{"method": "snmf"}]})
    assert spec.dictionaries[0].init == "svd"
