"""Detection scores of statistical labels, for every latent at once.

A label is scored on rows it was not read from: per latent, its held-out activating rows (quantile samples
whose window is not one of its top contexts; all samples if every one is) and its silent rows. The
classifier is `stat_labeler.matches` ("one of the label's n-grams ends at the marked token") and the score
`scoring.balanced_accuracy`; here both run as tensor comparisons over `[d_sae, rows, n-grams]`, since per
latent and per row in Python they cost more than the passes over the codes at small corpus sizes.
"""

from __future__ import annotations

from typing import NamedTuple

import polars as pl
import torch
from torch import Tensor

from featureatlas.tasks.labeling.scoring import balanced_accuracy
from featureatlas.tasks.labeling.stat_labeler import matches

__all__ = ["ScoredRows", "detection_scores", "scored_rows", "scored_texts"]


class ScoredRows(NamedTuple):
    """Per latent, the rows a label is scored on, as indices into the shown rows' windows: held-out
    activating rows (quantile samples outside its top contexts, or all samples if none is) and silent rows;
    -1 pads."""

    held_out: Tensor  # [d_sae, n_samples] index into the shown rows
    silent: Tensor  # [d_sae, n_random]
    held_key: Tensor  # the same rows' window indices
    silent_key: Tensor


def scored_rows(
    stats, shown_rows: Tensor, row_key: Tensor, top_lat: Tensor, top_key: Tensor, d_sae: int
) -> ScoredRows:
    """`stats`: the `ActivationStats`; `shown_rows` (ascending) and `row_key`: every sampled or silent row
    and its window's index; `top_lat`, `top_key`: each top context's latent (ascending) and window index."""
    key_of = torch.cat([row_key, torch.tensor([-1])])  # -1: no row

    def index(rows: Tensor) -> Tensor:  # position of each row (>= 0) in shown_rows, else len(shown_rows)
        at = torch.searchsorted(shown_rows, rows.contiguous())
        return torch.where(rows >= 0, at, len(shown_rows))

    samples = stats.sample_rows.view(d_sae, -1)
    at = index(samples)
    # a latent's top-context windows, -2 padded; a sample whose window is one of them is not held out
    n_top = torch.bincount(top_lat, minlength=d_sae)
    tops = torch.full((d_sae, max(int(n_top.max()) if len(top_lat) else 0, 1)), -2, dtype=torch.int64)
    tops[top_lat, torch.arange(len(top_lat)) - (n_top.cumsum(0) - n_top)[top_lat]] = top_key
    sampled = samples >= 0
    held = sampled & ~(key_of[at][:, :, None] == tops[:, None, :]).any(2)
    held = torch.where(held.any(1, keepdim=True), held, sampled)
    # the rows kept moved to the front, in sample (and candidate) order
    held_at = at.gather(1, torch.argsort((~held).to(torch.int8), dim=1, stable=True))
    held_at = torch.where(torch.arange(held.shape[1]) < held.sum(1, keepdim=True), held_at, len(shown_rows))
    silent = stats.random_rows >= 0
    silent_at = index(
        stats.random_rows.gather(1, torch.argsort((~silent).to(torch.int8), dim=1, stable=True))
    )
    none = len(shown_rows)
    return ScoredRows(
        torch.where(held_at < none, held_at, -1),
        torch.where(silent_at < none, silent_at, -1),
        key_of[held_at],
        key_of[silent_at],
    )


def detection_scores(labels: list, win: Tensor, half: int, scored: ScoredRows) -> list[float | None]:
    """Balanced accuracy of "one of the label's n-grams ends at the centre" on the held-out activating rows
    (positives) and the silent rows (negatives), per latent: `matches` and `balanced_accuracy`, for every
    latent at once. None without a label or without rows of either kind."""
    d_sae = len(labels)
    n_items = max((len(lab.items) for lab in labels), default=0)
    width = max((len(g) for lab in labels for g in lab.items), default=1)
    if n_items == 0 or width > half + 1:
        return [
            balanced_accuracy(
                [matches(lab.items, win.numpy(), int(k), half) for k in held if k >= 0],
                [matches(lab.items, win.numpy(), int(k), half) for k in silent if k >= 0],
            )
            if lab.items
            else None
            for lab, held, silent in zip(labels, scored.held_key, scored.silent_key)
        ]
    # n-grams right-aligned at the centre; -1 before a shorter one's first token matches anything
    grams = torch.full((d_sae, n_items, width), -1, dtype=torch.int64)
    real = torch.zeros(d_sae, n_items, dtype=torch.bool)
    for latent, lab in enumerate(labels):
        for j, gram in enumerate(lab.items):
            grams[latent, j, width - len(gram) :] = torch.tensor(gram)
            real[latent, j] = True
    tail = win[:, half - width + 1 : half + 1]

    def found(key: Tensor) -> Tensor:
        ids = tail[key.clamp_min(0)]  # [d_sae, m, width]
        same = (ids[:, :, None, :] == grams[:, None, :, :]) | (grams[:, None, :, :] < 0)
        return (same.all(3) & real[:, None, :]).any(2) & (key >= 0)

    n_pos, n_neg = (scored.held_key >= 0).sum(1), (scored.silent_key >= 0).sum(1)
    tpr = found(scored.held_key).sum(1).double() / n_pos
    tnr = 1 - found(scored.silent_key).sum(1).double() / n_neg
    score = ((tpr + tnr) / 2).tolist()
    ok = ((n_pos > 0) & (n_neg > 0) & real.any(1)).tolist()
    return [s if k else None for s, k in zip(score, ok)]


def scored_texts(text: pl.Series, scored: ScoredRows) -> tuple[list[list[str]], list[list[str]]]:
    """Per latent, the texts of its held-out activating rows and of its silent rows."""
    strings = text.to_list()
    held = [[strings[i] for i in row if i >= 0] for row in scored.held_out.tolist()]
    silent = [[strings[i] for i in row if i >= 0] for row in scored.silent.tolist()]
    return held, silent
