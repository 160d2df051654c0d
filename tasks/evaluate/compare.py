"""Compare every evaluated dictionary in the catalog: one table and the sparsity-fidelity frontier plots.

Each evaluation is joined with the dictionary it scored (method, hookpoint, d_sae). The plots put L0 on the
x axis (log scale) against FVU, the CE-loss score and the dead fraction, one line per (method, hookpoint),
so a method that dominates another sits below it (FVU) or above it (CE-loss score) at every L0.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

from pydantic import Field

from featureatlas.schemas.base import Contract
from featureatlas.schemas.settings import Settings
from featureatlas.tasks.tracking.catalog import Catalog
from featureatlas.tasks.tracking.stage import tracker_for

log = logging.getLogger(__name__)

__all__ = ["ComparisonRow", "comparison_rows", "frontier_plot", "log_comparison", "write_table"]


class ComparisonRow(Contract):
    """One evaluated dictionary, with the figures the comparison shows."""

    evaluation_id: str = Field(description="Catalog id of the evaluation.")
    dictionary_id: str = Field(description="Catalog id of the evaluated dictionary.")
    method: str = Field(description="Dictionary method, e.g. 'topk'.")
    hookpoint: str = Field(description="Hookpoint the dictionary reads.")
    d_sae: int = Field(description="Number of latents.")
    l0: float = Field(description="Mean active latents per token.")
    fvu: float = Field(description="Whole-set fraction of variance unexplained.")
    ce_loss_score: float = Field(description="CE-loss score against zero ablation.")
    ce_loss_score_mean: float | None = Field(None, description="CE-loss score against mean ablation.")
    dead_fraction: float = Field(description="Share of latents that never fired.")
    dense_fraction: float | None = Field(None, description="Share of dense latents (newer evaluations).")
    ioi_sufficiency: float | None = Field(
        None, description="Sufficiency on the indirect-object task (when `evaluate.supervised_prompts` > 0)."
    )


def comparison_rows(catalog: Catalog) -> list[ComparisonRow]:
    """A row per evaluation whose dictionary is still in the catalog, sorted by (method, hookpoint, L0)."""
    rows = []
    for _, evaluation in catalog.list("evaluation"):
        ref = evaluation.ref
        found = catalog.get(ref["dictionary_id"])
        if found is None:
            log.warning(
                "evaluation %s: dictionary %s is not in the catalog", evaluation.id, ref["dictionary_id"]
            )
            continue
        dictionary = found[1].ref
        details = ref.get("details") or {}  # older evaluations have none
        rows.append(
            ComparisonRow(
                evaluation_id=evaluation.id,
                dictionary_id=dictionary["id"],
                method=dictionary["config"]["method"],
                hookpoint=dictionary["hookpoint"],
                d_sae=dictionary["d_sae"],
                l0=ref["l0"],
                fvu=ref["fvu"],
                ce_loss_score=ref["ce_loss_score"],
                ce_loss_score_mean=details.get("ce_loss_score_mean"),
                dead_fraction=ref["dead_fraction"],
                dense_fraction=details.get("dense_fraction"),
                ioi_sufficiency=(details.get("supervised") or {}).get("dictionary_sufficiency"),
            )
        )
    return sorted(rows, key=lambda r: (r.method, r.hookpoint, r.l0))


def write_table(rows: list[ComparisonRow], path: Path) -> Path:
    """The rows as CSV, one column per field."""
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(ComparisonRow.model_fields))
        writer.writeheader()
        writer.writerows(r.model_dump() for r in rows)
    return path


def frontier_plot(rows: list[ComparisonRow], path: Path) -> Path:
    """FVU, CE-loss score and dead fraction against L0, one line per (method, hookpoint), saved as PNG."""
    if not rows:
        raise ValueError(
            "no evaluated dictionaries in the catalog; run a pipeline with `evaluate` enabled first"
        )
    # a bare Figure renders to PNG without pyplot: the caller's backend (a notebook's) is left alone
    from matplotlib.figure import Figure

    series: dict[tuple[str, str], list[ComparisonRow]] = {}
    for r in rows:
        series.setdefault((r.method, r.hookpoint), []).append(r)
    panels = [
        ("fvu", "FVU (lower is better)"),
        ("ce_loss_score", "CE-loss score vs zero ablation (higher is better)"),
        ("dead_fraction", "dead fraction"),
    ]
    fig = Figure(figsize=(15, 4.5), constrained_layout=True)
    axes = fig.subplots(1, 3)
    for ax, (field, title) in zip(axes, panels, strict=True):
        for (method, hookpoint), points in sorted(series.items()):
            points = sorted(points, key=lambda r: r.l0)
            ax.plot(
                [p.l0 for p in points],
                [getattr(p, field) for p in points],
                "o-",
                label=f"{method} @ {hookpoint}",
            )
        ax.set_xscale("log")
        ax.set_xlabel("L0 (active latents per token)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{len(rows)} evaluated dictionaries")
    fig.savefig(path, dpi=100)
    return path


def log_comparison(settings: Settings, rows: list[ComparisonRow], files: list[Path]) -> str:
    """Log the table's figures and the files to a new MLflow run named 'compare'; returns its id."""
    tracker = tracker_for(settings)
    with tracker.run("compare", tags={"featureatlas.stage": "compare"}) as run:
        run.log_params({"n_dictionaries": len(rows), "evaluations": ",".join(r.evaluation_id for r in rows)})
        for path in files:
            run.log_artifact(path)
        return run.run_id
