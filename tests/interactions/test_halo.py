"""The halo's geometry on hand-worked points: mirrored quadrants, radius = loss increase, none below L*."""

from __future__ import annotations

import math

import numpy as np
import torch

from featureatlas.tasks.interactions.plots import draw_halo, halo_plot, halo_points
from featureatlas.tasks.interactions.rashomon import SIGNS, HaloRing


def ring(a: list[float], quadrant: list[int], loss: list[float]) -> HaloRing:
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    return HaloRing(0.5, 1.0, t(a), torch.tensor(quadrant), t(loss))


def test_hand_worked_points():
    assert SIGNS == ((1, 1), (-1, 1), (-1, -1), (1, -1))  # quadrant index -> (sign of m_i - 1, of m_j - 1)
    r2 = 1 + math.sqrt(2)  # loss 1 + sqrt(2): increase sqrt(2), so a 45-degree point sits at (+-1, +-1)
    x, y, below = halo_points(
        ring(
            a=[1.0, 0.0, 0.5, 0.5, 0.5, 0.5, 0.5],
            quadrant=[0, 2, 0, 1, 2, 3, 1],
            loss=[1.3, 1.2, r2, r2, r2, r2, 0.9],
        )
    )
    expected = [
        (0.3, 0.0),  # all of epsilon on feature i, m_i up: on the positive i axis, radius 0.3
        (0.0, -0.2),  # all on j, m_j down: on the negative j axis
        (1.0, 1.0),  # half and half, both up
        (-1.0, 1.0),  # m_i down, m_j up: the mirror image across the j axis, not a rotation
        (-1.0, -1.0),
        (1.0, -1.0),
        (0.0, 0.0),  # below L*: at the origin, never through it into the opposite quadrant
    ]
    assert np.allclose(np.stack([x, y], 1), expected, atol=1e-12)
    assert below.tolist() == [False] * 6 + [True]


def test_mirrored_quadrants_keep_each_axis_to_one_feature():
    # the same split in all four quadrants: |x| is always feature i's share, |y| feature j's
    x, y, _ = halo_points(ring(a=[0.8] * 4, quadrant=[0, 1, 2, 3], loss=[1.5] * 4))
    assert np.allclose(np.abs(x), np.abs(x[0])) and np.allclose(np.abs(y), np.abs(y[0]))
    assert np.abs(x[0]) > np.abs(y[0])  # 80% of the budget on i: closer to the i axis
    assert np.sign(x).tolist() == [1, -1, -1, 1] and np.sign(y).tolist() == [1, 1, -1, -1]


def test_halo_plot_writes_a_png(tmp_path):
    r = ring(a=[1.0, 0.5, 0.0, 0.5], quadrant=[0, 1, 2, 3], loss=[1.4, 1.5, 0.95, 1.6])
    path = halo_plot([r], ("x1", "x2"), tmp_path / "halo.png")
    assert path.stat().st_size > 1000


def test_halo_axes_say_what_they_show():
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    below = ring(a=[1.0, 0.0], quadrant=[0, 0], loss=[1.2, 0.9])
    draw_halo(ax, [below], ("x1", "x2"))
    assert "loss increase over L*" in ax.get_xlabel() and "x1" in ax.get_xlabel()
    assert "loss increase over L*" in ax.get_ylabel() and "x2" in ax.get_ylabel()
    assert "budget" not in ax.get_xlabel() + ax.get_ylabel()
    # the model below L* sits at the origin, not at radius -0.1 in the opposite quadrant
    markers = [line for line in ax.get_lines() if line.get_marker() == "o"]
    drawn = np.concatenate([np.stack(line.get_data(), 1) for line in markers])
    assert np.allclose(drawn, [[0.2, 0.0], [0.0, 0.0]], atol=1e-12)
    plt.close(fig)
