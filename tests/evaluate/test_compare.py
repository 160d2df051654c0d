"""Comparison table and frontier plots from hand-made rows."""

from __future__ import annotations

import csv

import pytest

from featureatlas.tasks.evaluate.compare import ComparisonRow, frontier_plot, write_table


def row(method: str, l0: float, fvu: float, score: float, dead: float, hookpoint="model.layers.1"):
    return ComparisonRow(
        evaluation_id=f"eval-{method}-{l0}", dictionary_id=f"dict-{method}-{l0}", method=method,
        hookpoint=hookpoint, d_sae=256, l0=l0, fvu=fvu, ce_loss_score=score, dead_fraction=dead,
    )  # fmt: skip


ROWS = [
    row("topk", 8, 0.30, 0.80, 0.10),
    row("topk", 32, 0.15, 0.92, 0.05),
    row("topk", 128, 0.06, 0.97, 0.01),
    row("relu", 12, 0.40, 0.70, 0.30),
    row("relu", 60, 0.20, 0.88, 0.20),
]


def test_frontier_plot_writes_a_png(tmp_path):
    path = frontier_plot(ROWS, tmp_path / "frontier.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no evaluated dictionaries"):
        frontier_plot([], tmp_path / "empty.png")


def test_table_round_trips_through_csv(tmp_path):
    path = write_table(ROWS, tmp_path / "compare.csv")
    with path.open() as f:
        read = list(csv.DictReader(f))
    assert [r["dictionary_id"] for r in read] == [r.dictionary_id for r in ROWS]
    assert float(read[1]["fvu"]) == 0.15 and read[0]["ce_loss_score_mean"] == ""
