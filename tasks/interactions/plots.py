"""Halo and swarm plots of a Rashomon set (PNG; `Figure` objects render without pyplot, so no display is
needed and the caller's matplotlib backend, e.g. a notebook's inline one, is left alone).

Halo: for one pair, each split `a + b = 1` and sign combination `q` is a point at angle
`atan2(a, b) + q * pi / 2` whose radius is the actual loss increase of applying both scalings together.
Without interaction the increases add up to `a * eps + b * eps = eps`: the points lie on the circle of radius
`eps`; bumps in or out of it show the pair interacting. Several epsilons give nested rings.
Swarm: per pair, the FIS values over the set coloured by model loss, with a box and the reference marked.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from featureatlas.tasks.interactions.rashomon import Exploration, PairCloud


def halo_points(cloud: PairCloud, ex: Exploration) -> tuple[np.ndarray, np.ndarray]:
    """(angle, radius) of every split/sign model of the pair."""
    a = cloud.a.numpy()
    angle = np.arctan2(a, 1 - a) + cloud.quadrant.numpy() * math.pi / 2
    return angle, cloud.loss.numpy() - ex.ref_loss


def halo_plot(rings: list[tuple[Exploration, PairCloud]], names: tuple[str, str], path: Path) -> Path:
    fig = Figure(figsize=(5, 5))
    ax = fig.subplots()
    circle = np.linspace(0, 2 * math.pi, 200)
    colors = matplotlib.colormaps["viridis"](np.linspace(0.15, 0.85, len(rings)))
    for (ex, cloud), color in zip(rings, colors):
        angle, radius = halo_points(cloud, ex)
        order = np.lexsort((angle,))
        ax.plot(ex.epsilon * np.cos(circle), ex.epsilon * np.sin(circle), "--", color="grey", lw=0.8)
        ax.plot(
            radius[order] * np.cos(angle[order]),
            radius[order] * np.sin(angle[order]),
            "o-",
            color=color,
            ms=3,
            lw=1,
            label=f"epsilon = {ex.epsilon:.3g}",
        )
    ax.axhline(0, color="k", lw=0.5)
    ax.axvline(0, color="k", lw=0.5)
    ax.set_aspect("equal")
    ax.set_xlabel(f"budget on {names[1]} (sign by quadrant)")
    ax.set_ylabel(f"budget on {names[0]} (sign by quadrant)")
    ax.set_title(f"halo: {names[0]} x {names[1]}\ndashed: no-interaction circle")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def swarm_plot(
    clouds: list[PairCloud], ref_loss: float, names: list[str], path: Path, title: str = "the Rashomon set"
) -> Path:
    """FIS over the set per pair (rows), coloured by the model's loss increase; red cross: the reference."""
    fig = Figure(figsize=(9, 0.45 * len(clouds) + 1.5))
    ax = fig.subplots()
    rng = np.random.default_rng(0)
    increases = [c.loss[c.in_set] - ref_loss for c in clouds if c.in_set.any()]
    # a refit can beat the reference (increase < 0); the colour scale then starts below 0
    vmin = min([0.0] + [float(d.min()) for d in increases])
    vmax = max([vmin + 1e-12] + [float(d.max()) for d in increases])
    sc = None
    for row, c in enumerate(clouds):
        fis = c.fis[c.in_set].numpy()
        ax.boxplot([fis], positions=[row], vert=False, widths=0.6, showfliers=False)
        jitter = rng.uniform(-0.2, 0.2, len(fis))
        sc = ax.scatter(
            fis,
            row + jitter,
            c=c.loss[c.in_set].numpy() - ref_loss,
            cmap="viridis",
            vmin=vmin,
            vmax=vmax,
            s=10,
        )
        ax.plot([c.ref_fis], [row], "rx", ms=9, mew=2)
    ax.set_yticks(range(len(clouds)), names)
    ax.axvline(0, color="grey", lw=0.5)
    ax.set_xlabel("FIS = phi_ij - phi_i - phi_j")
    ax.set_title(f"FIS over {title} (red x: reference model)")
    if sc is not None:
        fig.colorbar(sc, ax=ax, label="loss increase over L*")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path
