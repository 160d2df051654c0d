"""What `featureatlas run` prints: the plan table, and a finished run's stages, figures and best labels."""

from __future__ import annotations

import json
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from featureatlas.flows.cli_common import console, fail
from featureatlas.schemas.settings import Settings


def print_plan(spec, settings: Settings, as_json: bool) -> None:
    from featureatlas.flows.plan import plan_pipeline
    from featureatlas.tasks.common.memory import human

    try:
        stages = plan_pipeline(spec, settings)
    except (ValueError, FileNotFoundError) as e:
        raise fail(str(e), 2) from None
    if as_json:
        print(
            json.dumps(
                [
                    {
                        "stage": s.stage,
                        "kind": s.ident.kind,
                        "id": s.ident.id,
                        "fingerprint": s.ident.fingerprint,
                        "parents": s.parents,
                        "reuse": s.reuse,
                        "path": s.path,
                        "memory_bytes": s.memory,
                        "device": s.device,
                    }
                    for s in stages
                ],
                indent=1,
            )
        )
        return
    table = Table(title=f"plan for {spec.name!r}")
    for col in ("stage", "artifact", "fingerprint", "inputs", "memory", "action"):
        table.add_column(col)
    for s in stages:
        table.add_row(
            escape(s.stage),
            s.ident.id,
            s.ident.fingerprint[:16],
            ", ".join(s.parents),
            "" if s.memory is None else f"{human(s.memory)} ({s.device})",
            "[green]reuse[/green]" if s.reuse else "[yellow]run[/yellow]",
        )
    console.print(table)


def print_examples(table_path: Path, n: int = 10) -> None:
    """The best-scored labels, so they can be judged at a glance (one latent per label)."""
    import polars as pl

    table = pl.read_parquet(table_path)
    label = pl.coalesce("stat_label", "label") if "stat_label" in table.columns else pl.col("label")
    score = pl.col("detection_score") if "detection_score" in table.columns else pl.col("label_share")
    best = (
        table.with_columns(shown=label, score=score)
        .filter(pl.col("shown").is_not_null() & (pl.col("frequency") > 1e-3))
        .filter(pl.col("shown").str.strip_chars('" \n') != "")
        .sort(["score", "max_activation"], descending=True, nulls_last=True)
        .unique("shown", keep="first", maintain_order=True)
        .head(n)
    )
    console.print(f"  features: {table_path} ({table['label'].is_not_null().sum()} of {table.height} fired)")
    for row in best.iter_rows(named=True):
        context = row["contexts"][0]["text"]
        line = (
            f"    latent {row['latent']:>5} {row['shown']:>24}  score {row['score'] or 0:.2f}  "
            f"freq {row['frequency']:.4f}  {context!r}"
        )
        console.print(line, markup=False)


def print_interactions(ref, n: int = 5) -> None:
    """The pairs that interact (outside their null band), then those whose FIS varies most over the set."""
    import polars as pl

    table = pl.read_parquet(Path(ref.path) / "scores.parquet")
    console.print(
        f"[bold]{ref.id}[/bold] ({ref.source}, {ref.spec.reference}, {ref.spec.model_class}): L* "
        f"{ref.ref_loss:.4f}, epsilon {ref.epsilon:.4f}, {ref.n_pairs} pairs scored, "
        f"{ref.n_interacting} outside their additive null band; first:"
    )
    ranges = [c for c in ("fis_range", "retrain_fis_range") if c in table.columns]
    for row in table.head(n).iter_rows(named=True):
        spans = "  ".join(f"{c} {row[c]:.4f}" for c in ranges)
        line = (
            f"    {row['feature_i']} x {row['feature_j']}: fis_ref {row['fis_ref']:.4f} "
            f"+- {row['fis_se']:.4f}  interacts {row['interacts']}  {spans}"
        )
        console.print(line, markup=False)
    if ref.retrain_note:
        console.print(f"  retraining class empty: {ref.retrain_note}", markup=False)
    console.print(f"  scores and plots: {ref.path}")


def print_result(result, settings: Settings) -> None:
    from featureatlas.tasks.tracking.stage import tracker_for

    client = tracker_for(settings).client
    children = client.search_runs(
        [tracker_for(settings).experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{result.mlflow_run_id}'",
        order_by=["attributes.start_time ASC"],
    )
    table = Table(title="stages")
    for col in ("stage", "artifact", "seconds"):
        table.add_column(col)
    for r in children:
        secs = ((r.info.end_time or r.info.start_time) - r.info.start_time) / 1000
        table.add_row(
            escape(r.data.tags.get("mlflow.runName", "")),  # names hold [..]: not markup
            r.data.tags.get("featureatlas.artifact_id", ""),
            f"{secs:.1f}",
        )
    console.print(table)
    for d in result.dictionaries:
        ev = d.evaluation
        line = (
            f"[bold]{d.dictionary.id}[/bold] ({d.dictionary.config.method}, {d.dictionary.hookpoint}, "
            f"d_sae={d.dictionary.d_sae})"
        )
        if ev is not None:
            line += (
                f": FVU {ev.fvu:.3f}  L0 {ev.l0:.1f}  dead {ev.dead_fraction:.3f}  "
                f"CE-loss score {ev.ce_loss_score:.3f} (clean {ev.ce_loss_clean:.3f}, spliced "
                f"{ev.ce_loss_spliced:.3f}, zero {ev.ce_loss_zero:.3f})"
            )
        console.print(line)
        if d.labeling is not None:
            print_examples(Path(d.labeling.path) / "features.parquet")
    if result.interactions is not None:
        print_interactions(result.interactions)
    console.print(f"MLflow run {result.mlflow_run_id}: see it with `featureatlas ui`")
    console.print(
        f"catalog: `featureatlas catalog lineage {result.dictionaries[0].dictionary.id}`"
        if result.dictionaries
        else ""
    )
