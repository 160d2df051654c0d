"""Halo and swarm plots of a Rashomon set (PNG; `Figure` objects render without pyplot, so no display is
needed and the caller's matplotlib backend, e.g. a notebook's inline one, is left alone).

Halo (one pair `i, j`, one ring per epsilon): a boundary model spends the share `a` of epsilon on scaling
feature i and `1 - a` on feature j, in one of four sign combinations (`m_i` up or down, `m_j` up or down).
It is drawn at radius `r` = its actual loss increase over L* and angle `theta = atan2(1 - a, a)` in the first
quadrant, *mirrored* into the others: `(x, y) = (s_i r cos theta, s_j r sin theta)`, so that everywhere the
horizontal axis is feature i's side (right: m_i > 1, left: m_i < 1) and the vertical one feature j's.
Without interaction the increases add up to `a eps + (1 - a) eps = eps`: the points lie on the dashed circle
of radius eps; bumps in or out of it show the pair interacting. A model whose loss is *below* L* has no
meaningful radius (a negative one would put it through the origin into the opposite quadrant): it is drawn at
the origin with an open marker and counted in the legend.

Swarm: one panel per pair, each on its own horizontal scale (FIS of different pairs differ by orders of
magnitude) spanning its cloud and the reference, with the models' FIS coloured by loss increase, the reference
(red x) with its Monte-Carlo error bar, the null band (grey) of what an additive truth would show, and the
range and verdict written out.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from featureatlas.tasks.interactions.rashomon import SIGNS, HaloRing, PairCloud


def halo_points(ring: HaloRing) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(x, y, below)` of every boundary model: mirrored quadrants, radius = max(loss - L*, 0); `below`
    marks the models whose loss is under L* (drawn at the origin)."""
    a = ring.a.numpy()
    theta = np.arctan2(1 - a, a)
    signs = np.array(SIGNS, dtype=float)[ring.quadrant.numpy()]  # [B, 2]: (s_i, s_j)
    increase = ring.loss.numpy() - ring.ref_loss
    radius = np.maximum(increase, 0.0)
    return signs[:, 0] * radius * np.cos(theta), signs[:, 1] * radius * np.sin(theta), increase < 0


def _ring_order(ring: HaloRing) -> np.ndarray:
    """Order the models around the circle by their *planned* direction, so the drawn line never crosses."""
    a = ring.a.numpy()
    signs = np.array(SIGNS, dtype=float)[ring.quadrant.numpy()]
    angle = np.arctan2(signs[:, 1] * (1 - a), signs[:, 0] * a)
    return np.argsort(angle, kind="stable")


def halo_plot(rings: list[HaloRing], names: tuple[str, str], path: Path) -> Path:
    fig = Figure(figsize=(5.5, 5.5))
    ax = fig.subplots()
    draw_halo(ax, rings, names)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def draw_halo(ax: Axes, rings: list[HaloRing], names: tuple[str, str]) -> None:
    """The halo of `rings` (one per epsilon) on `ax`, axes labelled with what they show."""
    circle = np.linspace(0, 2 * math.pi, 200)
    colors = matplotlib.colormaps["viridis"](np.linspace(0.15, 0.85, len(rings)))
    for ring, color in zip(rings, colors):
        x, y, below = halo_points(ring)
        order = _ring_order(ring)
        ax.plot(ring.epsilon * np.cos(circle), ring.epsilon * np.sin(circle), "--", color="grey", lw=0.8)
        # the ring is broken at models below L* rather than routed through the origin
        lx, ly = np.where(below, np.nan, x)[order], np.where(below, np.nan, y)[order]
        ax.plot(np.append(lx, lx[0]), np.append(ly, ly[0]), "-", color=color, lw=1)
        ax.plot(x[~below], y[~below], "o", color=color, ms=3, label=f"epsilon = {ring.epsilon:.3g}")
        if below.any():
            ax.plot(x[below], y[below], "o", mfc="none", color=color, ms=6, label=f"{below.sum()} below L*")
    ax.axhline(0, color="k", lw=0.5)
    ax.axvline(0, color="k", lw=0.5)
    ax.set_aspect("equal")
    ax.set_xlabel(f"loss increase over L*, toward {names[0]}\n(right: {names[0]} scaled up, left: down)")
    ax.set_ylabel(f"loss increase over L*, toward {names[1]}\n(up: {names[1]} scaled up, down: down)")
    ax.set_title(f"halo: {names[0]} x {names[1]}\ndashed: no interaction (increases add up to epsilon)")
    ax.legend(fontsize=7, loc="lower right")


def swarm_plot(
    clouds: list[PairCloud],
    ref_loss: float,
    names: list[str],
    path: Path,
    title: str = "the Rashomon set",
    bands: list[tuple[float, float]] | None = None,
) -> Path:
    """One panel per pair on its own scale: FIS over the set coloured by loss increase, the reference
    (red x, bar: +- 2 Monte-Carlo standard errors) and the null band `bands[k] = (low, high)` (grey)."""
    fig = Figure(figsize=(9, 1.0 * len(clouds) + 1.2), layout="constrained")
    axes = fig.subplots(len(clouds), 1, squeeze=False)
    rng = np.random.default_rng(0)
    increases = [c.loss[c.in_set] - ref_loss for c in clouds if c.in_set.any()]
    # a model can beat the reference (increase < 0); the colour scale then starts below 0
    vmin = min([0.0] + [float(d.min()) for d in increases])
    vmax = max([vmin + 1e-12] + [float(d.max()) for d in increases])
    sc = None
    for k, (ax, c) in enumerate(zip(axes[:, 0], clouds)):
        fis = c.fis[c.in_set].numpy()
        se = 0.0 if math.isnan(c.ref_fis_se) else 2 * c.ref_fis_se
        # the scale is the pair's own: its cloud and the reference's error bar (the band may run off it)
        shown = np.concatenate([fis, [c.ref_fis - se, c.ref_fis + se]])
        lo, hi = float(shown.min()), float(shown.max())
        pad = 0.1 * (hi - lo) or 0.05 * max(abs(lo), 1e-6)
        note = f"range {fis.max(initial=c.ref_fis) - fis.min(initial=c.ref_fis):.3g}"
        if bands is not None:
            ax.axvspan(*bands[k], color="grey", alpha=0.25, lw=0)
            inside = bands[k][0] <= c.ref_fis <= bands[k][1]
            note += f"; null band [{bands[k][0]:.3g}, {bands[k][1]:.3g}]: " + (
                "inside" if inside else "outside"
            )
        sc = ax.scatter(
            fis,
            rng.uniform(-0.3, 0.3, len(fis)),
            c=c.loss[c.in_set].numpy() - ref_loss,
            cmap="viridis",
            vmin=vmin,
            vmax=vmax,
            s=8,
        )
        ax.errorbar([c.ref_fis], [0], xerr=[se], fmt="rx", ms=8, mew=2, capsize=3)
        ax.set_xlim(lo - pad, hi + pad)
        ax.set_ylim(-0.5, 0.5)
        ax.set_yticks([])
        ax.set_ylabel(names[k], rotation=0, ha="right", va="center", fontsize=8)
        ax.text(0.01, 0.97, note, transform=ax.transAxes, fontsize=7, va="top")
        if lo - pad < 0 < hi + pad:
            ax.axvline(0, color="k", lw=0.5)
        ax.tick_params(axis="x", labelsize=7)
    axes[-1, 0].set_xlabel("FIS = phi_ij - phi_i - phi_j (each pair on its own scale)")
    axes[0, 0].set_title(f"FIS over {title} (red x: reference +- 2 s.e.; grey: additive null band)")
    if sc is not None:
        fig.colorbar(sc, ax=axes[:, 0].tolist(), label="loss increase over L*")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path
