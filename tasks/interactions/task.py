"""Prefect task of the interaction stage: fit a reference model on a table, score its pairs over the set."""

from __future__ import annotations

from pathlib import Path

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from schemas.artifacts import InteractionScoresRef
from schemas.spec import InteractionsSpec
from tasks.interactions.data import fit_reference, load_table
from tasks.interactions.plots import halo_plot, swarm_plot
from tasks.interactions.rashomon import explore, pair_cloud
from tasks.interactions.score import score_pairs
from tasks.tracking.identity import interactions_identity
from tasks.tracking.mlflow_runs import StageRun
from tasks.tracking.stage import StageContext, run_stage


def build_scores(spec: InteractionsSpec, folder: Path) -> dict:
    """Write `scores.parquet`, `halo.png` and `swarm.png` into `folder`; return the reference's fields."""
    table = load_table(spec.table, spec.target, spec.task, spec.heldout_fraction, spec.seed)
    f = fit_reference(spec.reference, table, spec.seed)
    X, y = torch.as_tensor(table.X_test), torch.as_tensor(table.y_test)
    scores = score_pairs(
        f,
        X,
        y,
        table.features,
        table.loss,
        spec.rate,
        spec.n_permutations,
        spec.seed,
        table.task == "classification",
        max_scale=spec.max_scale,
    )
    scores.table.write_parquet(folder / "scores.parquet")
    by_pair = {(table.features[c.pair[0]], table.features[c.pair[1]]): c for c in scores.clouds}
    top = list(scores.table.select("feature_i", "feature_j").head(spec.plot_pairs).iter_rows())
    swarm_plot(
        [by_pair[t] for t in top],
        scores.exploration.ref_loss,
        [f"{a} x {b}" for a, b in top],
        folder / "swarm.png",
    )
    pair = by_pair[top[0]].pair
    rings = []
    for rate in sorted(spec.halo_rates):
        ex = explore(f, X, y, table.loss, rate, max_scale=spec.max_scale)
        rings.append((ex, pair_cloud(f, X, y, ex, pair, torch.stack([torch.arange(X.shape[0])]), table.loss)))
    halo_plot(rings, top[0], folder / "halo.png")
    m = scores.multiplicity
    return {
        "n_features": len(table.features),
        "n_pairs": scores.table.height,
        "ref_loss": scores.exploration.ref_loss,
        "epsilon": scores.exploration.epsilon,
        "top_pair": list(top[0]),
        "ambiguity": m.ambiguity if m else None,
        "discrepancy": m.discrepancy if m else None,
        "max_fis_range": float(scores.table["fis_range"].max()),
    }


@task(name="score_interactions", cache_policy=NO_CACHE)
def score_interactions(ctx: StageContext, spec: InteractionsSpec) -> InteractionScoresRef:
    ident = interactions_identity(spec)

    def build(folder: Path, run: StageRun) -> tuple[dict, dict]:
        facts = build_scores(spec, folder)
        metrics = {k: v for k, v in facts.items() if isinstance(v, float)}
        run.log_metrics(metrics)
        for name in ("scores.parquet", "halo.png", "swarm.png"):
            run.log_artifact(folder / name)
        fields = {k: v for k, v in facts.items() if k != "max_fis_range"}
        columns = {"source": spec.table, "reference": spec.reference, "n_features": facts["n_features"]}
        return fields | {"spec": spec, "source": spec.table}, columns | {"metrics": metrics}

    return run_stage(
        ctx,
        ident,
        InteractionScoresRef,
        name=f"score_interactions[{spec.table}, {spec.reference}]",
        config=spec.model_dump(mode="json"),
        parents=[],
        build=build,
    )
