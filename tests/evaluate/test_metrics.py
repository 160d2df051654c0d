"""Reconstruction metrics against hand-worked values, and streamed figures against whole-set ones."""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch
from torch import Tensor, nn

from featureatlas.tasks.evaluate.metrics import reconstruction_metrics


class ForwardOutput(NamedTuple):
    acts_hat: Tensor
    codes: Tensor


class ReluLinear(nn.Module):
    """Stand-in dictionary: codes = relu(x @ W_enc + b_enc), acts_hat = codes @ W_dec + b_dec."""

    def __init__(
        self, W_enc: Tensor, W_dec: Tensor, b_enc: Tensor | None = None, b_dec: Tensor | None = None
    ):
        super().__init__()
        self.d_in, self.d_sae = W_enc.shape
        self.W_enc, self.W_dec = nn.Parameter(W_enc.float()), nn.Parameter(W_dec.float())
        self.b_enc = nn.Parameter(torch.zeros(self.d_sae) if b_enc is None else b_enc.float())
        self.b_dec = nn.Parameter(torch.zeros(self.d_in) if b_dec is None else b_dec.float())

    def encode(self, acts: Tensor) -> Tensor:
        return torch.relu(acts @ self.W_enc + self.b_enc)

    def decode(self, codes: Tensor) -> Tensor:
        return codes @ self.W_dec + self.b_dec

    def forward(self, acts: Tensor) -> ForwardOutput:
        codes = self.encode(acts)
        return ForwardOutput(self.decode(codes), codes)


def identity_dictionary(d: int, scale: Tensor | None = None, centre: float = 0.0) -> ReluLinear:
    """codes = relu([x - c, c - x]), acts_hat = c + scale * (codes[:d] - codes[d:]); exact when scale is 1."""
    eye, scale = torch.eye(d), torch.ones(d) if scale is None else scale
    b_enc = torch.cat([torch.full((d,), -centre), torch.full((d,), centre)])
    W_dec = torch.cat([torch.diag(scale), -torch.diag(scale)], dim=0)
    return ReluLinear(torch.cat([eye, -eye], dim=1), W_dec, b_enc, torch.full((d,), centre))


# d_in 2, d_sae 3. Latent 0 reads and writes x0; latent 1 reads x1 but writes nothing (x1 is lost);
# latent 2 reads nothing, so it is dead.
W_ENC = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
W_DEC = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
ACTS = torch.tensor([[2.0, 1.0], [0.0, -1.0], [-2.0, 3.0], [4.0, 1.0]])
# codes = (relu x0, relu x1, 0):  (2,1,0) (0,0,0) (0,3,0) (4,1,0) -> nonzero 2+0+1+2 = 5 -> L0 = 5/4
# x_hat = (relu x0, 0):           (2,0)   (0,0)   (0,0)   (4,0)
# x - x_hat:                      (0,1)   (0,-1)  (-2,3)  (0,1)  -> squared 1+1+13+1 = 16
#                                                                 -> MSE = 16 / (4 tokens * 2 dims) = 2
# mean x = (4/4, 4/4) = (1, 1); x - mean: (1,0) (-1,-2) (-3,2) (3,0) -> squared 1+5+13+9 = 28
# FVU = 16/28 = 4/7, explained variance 3/7; dead = latent 2 of 3 = 1/3.


@pytest.mark.parametrize("batch_size", [1, 3, 4, 4096])
def test_hand_worked_example(batch_size):
    m = reconstruction_metrics(ReluLinear(W_ENC, W_DEC), ACTS, batch_size=batch_size)
    assert m.n_tokens == 4
    assert m.fvu == pytest.approx(4 / 7, rel=1e-12)
    assert m.explained_variance == pytest.approx(3 / 7, rel=1e-12)
    assert m.mse == pytest.approx(2.0, rel=1e-12)
    assert m.l0 == pytest.approx(1.25, rel=1e-12)
    assert m.dead_fraction == pytest.approx(1 / 3, rel=1e-12)


def test_streamed_equals_whole_set_with_a_large_mean():
    gen = torch.Generator().manual_seed(0)
    # Quarter-integers around 300, and a dictionary that halves every other coordinate about 300: every
    # float32 product is exact, so the reference below sees the very same x_hat whatever the batching.
    # The mean is far from zero: per-batch means or a naive sum-of-squares variance would show here.
    acts = 300.0 + torch.randint(-8, 9, (1000, 16), generator=gen) / 4
    scale = torch.tensor([1.0, 0.5] * 8)
    dictionary = identity_dictionary(16, scale, centre=300.0)
    whole = reconstruction_metrics(dictionary, acts, batch_size=10_000)
    streamed = reconstruction_metrics(dictionary, acts, batch_size=7)

    x = acts.double()
    x_hat = 300.0 + scale.double() * (x - 300.0)
    fvu = ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert 0.05 < fvu < 0.5
    for m in (whole, streamed):
        assert m.fvu == pytest.approx(fvu.item(), rel=1e-12)
        assert m.mse == pytest.approx((((x - x_hat) ** 2).sum() / x.numel()).item(), rel=1e-12)
        # One of relu(x - 300), relu(300 - x) per coordinate is nonzero unless x is exactly 300.
        assert m.l0 == pytest.approx((acts != 300.0).sum().item() / 1000, rel=1e-12)
    assert streamed.dead_fraction == whole.dead_fraction == 0.0


def test_identity_dictionary_is_perfect():
    acts = torch.randn(50, 8, generator=torch.Generator().manual_seed(1))
    m = reconstruction_metrics(identity_dictionary(8), acts, batch_size=16)
    assert m.fvu == 0.0 and m.mse == 0.0 and m.explained_variance == 1.0
    # Exactly one of relu(x_i), relu(-x_i) is nonzero for each of the 8 coordinates.
    assert m.l0 == 8.0
    assert m.dead_fraction == 0.0


def test_shape_errors_say_what_to_do():
    with pytest.raises(ValueError, match=r"\[n, 8\].*\[50, 6\]"):
        reconstruction_metrics(identity_dictionary(8), torch.randn(50, 6))
    with pytest.raises(ValueError, match="reshape"):
        reconstruction_metrics(identity_dictionary(8), torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match="variance is 0"):
        reconstruction_metrics(identity_dictionary(8), torch.ones(10, 8))


def test_hand_worked_direction_sparsity_and_histogram():
    # Same example. cos(x, x_hat) and ||x_hat|| / ||x|| per row, x_hat = (relu x0, 0):
    #   (2,1)->(2,0): 2/sqrt5 both;  (0,-1)->0: 0;  (-2,3)->0: 0;  (4,1)->(4,0): 4/sqrt17 both.
    # Firing frequencies: latent 0 rows {0,3} -> 0.5, latent 1 rows {0,2,3} -> 0.75, latent 2 never.
    # Dense above 0.6: latent 1 -> 1/3. Histogram (n=4, 2 bins a decade): edges -1, -0.5, 0; both live
    # latents have log10 f in (-0.5, 0] -> counts (0, 2).
    # Per-batch FVU at batch 2: rows 0-1 err 2, dev 4 -> 0.5; rows 2-3 err 14, dev 20 -> 0.7; mean 0.6.
    m = reconstruction_metrics(ReluLinear(W_ENC, W_DEC), ACTS, batch_size=2, dense_threshold=0.6)
    expected = (2 / 5**0.5 + 4 / 17**0.5) / 4
    assert m.cosine_similarity == pytest.approx(expected, rel=1e-12)
    assert m.norm_ratio == pytest.approx(expected, rel=1e-12)
    assert m.dense_fraction == pytest.approx(1 / 3, rel=1e-12)
    assert m.freq_hist_edges == [-1.0, -0.5, 0.0]
    assert m.freq_hist_counts == [0, 2]
    assert m.fvu_batch_mean == pytest.approx(0.6, rel=1e-12)
    assert m.fvu == pytest.approx(4 / 7, rel=1e-12)  # the whole-set figure differs, as it should


def test_identity_and_zero_ends_of_direction_figures():
    acts = torch.randn(64, 8, generator=torch.Generator().manual_seed(2))
    exact = reconstruction_metrics(identity_dictionary(8), acts, batch_size=16)
    assert exact.cosine_similarity == pytest.approx(1.0, abs=1e-6)
    assert exact.norm_ratio == pytest.approx(1.0, abs=1e-6)
    # relu(x_i) fires on about half the rows: every latent is dense at 10%, none at 90%.
    assert exact.dense_fraction == 1.0
    assert sum(exact.freq_hist_counts) == 16
    zero = reconstruction_metrics(ReluLinear(torch.zeros(8, 4), torch.zeros(4, 8)), acts)
    assert zero.cosine_similarity == 0.0 and zero.norm_ratio == 0.0
    assert zero.dead_fraction == 1.0 and sum(zero.freq_hist_counts) == 0


class SmallResidueCodes(ReluLinear):
    """codes = relu(x W_enc) + 0.01 (never exactly 0, as semi-NMF's); fires only at >= 0.5 (`active`)."""

    def encode(self, acts: Tensor) -> Tensor:
        return super().encode(acts) + 0.01

    def active(self, codes: Tensor) -> Tensor:
        return codes >= 0.5


def test_firing_follows_the_dictionary_active_mask():
    # Same weights as the hand-worked example; codes are those + 0.01 everywhere:
    # firing (>= 0.5): (2,1,.) (.,.,.) (.,3,.) (4,1,.) -> 5 of 12 -> L0 5/4, latent 2 dead (1/3).
    # Counting "!= 0" instead would give L0 3 and no dead latent.
    m = reconstruction_metrics(SmallResidueCodes(W_ENC, W_DEC), ACTS, batch_size=3)
    assert m.l0 == pytest.approx(5 / 4)
    assert m.dead_fraction == pytest.approx(1 / 3)
    assert m.dense_fraction == pytest.approx(2 / 3)  # latents 0 and 1 fire on 2 of 4 and 3 of 4 rows


def test_semi_nmf_l0_is_its_active_count_not_d_sae():
    from featureatlas.schemas.methods import SemiNMFConfig
    from featureatlas.tasks.dictionary import train_dictionary
    from featureatlas.tasks.dictionary.synthetic import planted_snmf

    truth = planted_snmf(n=600, d_in=40, r=6, seed=3)
    cfg = SemiNMFConfig(d_sae=6, sparsity=0.2, max_iters=20, init_passes=10, batch_size=600)
    result = train_dictionary(cfg, truth.acts)
    snmf = result.dictionary
    with torch.no_grad():
        codes = snmf.encode(truth.acts)
    # The codes hardly ever reach 0: "!= 0" would say nearly every latent fires on every token.
    assert (codes != 0).sum(-1).double().mean().item() > 0.9 * snmf.d_sae
    m = reconstruction_metrics(snmf, truth.acts)
    expected = snmf.active(codes).sum(-1).double().mean().item()
    assert m.l0 == pytest.approx(expected)
    assert m.l0 < 0.8 * snmf.d_sae
    # Training's L0 counts with the same rule (on its own fit's codes): near the evaluation's, not d_sae.
    assert abs(result.final_metrics["l0"] - m.l0) < 0.25 * snmf.d_sae


def test_ablation_counts_firing_by_the_same_rule():
    from featureatlas.tasks.evaluate.ablation import latent_contribution

    # Latent 1 reads x1: codes 1.01, 0.01, 3.01, 1.01 -> fires (>= 0.5) on rows 0, 2, 3, not on row 1,
    # although its code there is nonzero.
    _, fired = latent_contribution(SmallResidueCodes(W_ENC, W_DEC), ACTS, latent=1)
    assert fired.tolist() == [True, False, True, True]
