"""Decoder geometry on dictionaries of known answer: the neuron basis, a rotation, planted duplicates."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from featureatlas.tasks.evaluate.geometry import (
    atomic_geometry,
    decoder_directions,
    decoder_geometry,
    whitening,
)


class Linear(nn.Module):
    """decode(codes) = codes @ W_dec + b_dec; encode is not needed here."""

    def __init__(self, W_dec: Tensor, b_dec: Tensor | None = None):
        super().__init__()
        self.d_sae, self.d_in = W_dec.shape
        self.W_dec = nn.Parameter(W_dec.float())
        self.b_dec = nn.Parameter(torch.zeros(self.d_in) if b_dec is None else b_dec.float())

    def decode(self, codes: Tensor) -> Tensor:
        return codes @ self.W_dec + self.b_dec


def test_directions_ignore_the_decoder_bias():
    W = torch.randn(10, 4)
    got = decoder_directions(Linear(W, torch.full((4,), 7.0)), chunk=3)
    torch.testing.assert_close(got, W)


def test_neuron_basis_is_orthogonal_and_fully_aligned():
    g = decoder_geometry(Linear(3 * torch.eye(8)))
    assert g.coherence == 0.0 and g.mean_max_cosine == 0.0 and g.duplicate_fraction == 0.0
    assert g.neuron_alignment == pytest.approx(1.0)


def test_rotated_basis_is_orthogonal_but_not_neuron_aligned():
    # A Hadamard basis: orthogonal rows, every entry +-1/sqrt(8) -> alignment 1/sqrt(8).
    H = torch.tensor([[1.0]])
    for _ in range(3):
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    g = decoder_geometry(Linear(H))
    assert g.coherence == pytest.approx(0.0, abs=1e-6)
    assert g.neuron_alignment == pytest.approx(8**-0.5, rel=1e-6)


def test_planted_duplicates_and_a_dead_direction():
    # Rows: e0, e1, e2, -e0 (antiparallel copy of row 0), (e1 + e2)/sqrt2 (cos 1/sqrt2 to rows 1 and 2),
    # and a zero row, which has no direction and is left out.
    r = 2**-0.5
    W = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [-1, 0, 0], [0, r, r], [0, 0, 0]])
    g = decoder_geometry(Linear(W), duplicate_threshold=0.9, chunk=2)
    assert g.n_directions == 5
    assert g.coherence == pytest.approx(1.0)
    # Nearest |cos|: rows 0 and 3 -> 1; rows 1, 2, 4 -> 1/sqrt2.
    assert g.mean_max_cosine == pytest.approx((2 + 3 * r) / 5, rel=1e-6)
    assert g.duplicate_fraction == pytest.approx(2 / 5)
    assert g.neuron_alignment == pytest.approx((4 + r) / 5, rel=1e-6)


# Atomic inner product: cos of whitened directions is d_i^T S d_j / sqrt(d_i^T S d_i * d_j^T S d_j).


def test_whitening_a_diagonal_second_moment():
    # x in {+-2 e0, +-e1}: E[x x^T] = diag(2, 0.5), so at ridge 0 S^(1/2) = diag(1/sqrt2, sqrt2).
    acts = torch.tensor([[2.0, 0], [-2, 0], [0, 1], [0, -1]])
    S_half, lam = whitening(acts, ridge=0.0)
    assert lam == 0.0
    torch.testing.assert_close(S_half, torch.diag(torch.tensor([2**-0.5, 2**0.5], dtype=torch.float64)))
    # d1 = e0, d2 = e0 + e1 (Euclidean cos 1/sqrt2): whitened (1/sqrt2, 0) and (1/sqrt2, sqrt2), cos 1/sqrt5.
    dictionary = Linear(torch.tensor([[1.0, 0], [1, 1]]))
    g = atomic_geometry(dictionary, acts, l0=1.5, ridge=0.0)
    assert g.n_directions == 2 and g.bound == pytest.approx(0.5)
    assert g.max_coherence == pytest.approx(5**-0.5) and g.mean_coherence == pytest.approx(5**-0.5)
    assert g.unique_fraction == 1.0  # 0.447 < 1/(2*1.5 - 1) = 0.5
    assert atomic_geometry(dictionary, acts, l0=2.0, ridge=0.0).unique_fraction == 0.0  # 0.447 > 1/3
    # A diagonal E[x x^T] keeps the neurons orthogonal; every row of x has one nonzero coordinate.
    assert g.neuron_max_coherence == pytest.approx(0.0, abs=1e-12)
    assert g.neuron_l0 == 1.0 and g.neuron_unique_fraction == 1.0 and g.neuron_unique_fraction_own_l0 == 1.0


def test_correlated_activations_make_the_neuron_basis_coherent():
    # 3 x +-(1, 1) and 1 x +-(1, -1): E[x x^T] = [[1, .5], [.5, 1]], S = (4/3) [[1, -.5], [-.5, 1]],
    # so the whitened neurons have cos = S_01 / S_00 = -1/2: mu = 1/2 for both, e0 and e1 being orthogonal.
    acts = torch.tensor([[1.0, 1]] * 3 + [[-1.0, -1]] * 3 + [[1.0, -1], [-1.0, 1]])
    dictionary = Linear(torch.eye(2))  # the dictionary *is* the neuron basis
    g = atomic_geometry(dictionary, acts, l0=1.2, ridge=0.0)
    assert g.max_coherence == pytest.approx(0.5) and g.neuron_max_coherence == pytest.approx(0.5)
    assert g.unique_fraction == 1.0  # 0.5 < 1/(2.4 - 1) = 0.714
    assert g.neuron_l0 == 2.0 and g.neuron_unique_fraction_own_l0 == 0.0  # 0.5 > 1/3
    # (1, 1) and (1, -1) are the eigenvectors of S: d^T S d' = (4/3)(1 - 1 + .5 - .5) = 0, still orthogonal.
    g = atomic_geometry(Linear(torch.tensor([[1.0, 1], [1, -1]])), acts, l0=1.0, ridge=0.0)
    assert g.max_coherence == pytest.approx(0.0, abs=1e-7)


def test_ridge_is_relative_to_the_mean_eigenvalue():
    # x in {+-2 e0, +-e1, +-e2}: E[x x^T] = diag(4, 1, 1) / 3, mean eigenvalue 2/3; ridge 0.5 -> lambda 1/3,
    # S = diag(3/5, 3/2, 3/2). d = (1, 1, 0), d' = (1, 0, 1): cos = (3/5) / (3/5 + 3/2) = 2/7.
    acts = torch.tensor([[2.0, 0, 0], [-2, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]])
    dictionary = Linear(torch.tensor([[1.0, 1, 0], [1, 0, 1], [0, 0, 0]]))  # the zero row is left out
    g = atomic_geometry(dictionary, acts, l0=1.0, ridge=0.5)
    assert g.lambda_value == pytest.approx(1 / 3) and g.n_directions == 2
    assert g.max_coherence == pytest.approx(2 / 7)
    # The Euclidean figure of the same directions is 1/2: the old and new definitions differ.
    assert decoder_geometry(dictionary).coherence == pytest.approx(0.5)


def test_singular_second_moment_needs_a_ridge():
    acts = torch.tensor([[1.0, 0], [-1, 0]])  # the second coordinate never varies
    with pytest.raises(ValueError, match="geometry_ridge"):
        atomic_geometry(Linear(torch.eye(2)), acts, l0=1.0, ridge=0.0)
    assert atomic_geometry(Linear(torch.eye(2)), acts, l0=1.0, ridge=1e-3).neuron_max_coherence < 1e-9
