"""Decoder geometry on dictionaries of known answer: the neuron basis, a rotation, planted duplicates."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from tasks.evaluate.geometry import decoder_directions, decoder_geometry


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
