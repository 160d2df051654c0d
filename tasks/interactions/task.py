"""Prefect task of the interaction stage: build the table (a file, a bundled dataset, or a probe table of a
dictionary's latents), fit a reference model, score its pairs over the Rashomon set, register with lineage."""

from __future__ import annotations

from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from featureatlas.schemas.artifacts import ActivationCacheRef, DictionaryRef, InteractionScoresRef
from featureatlas.schemas.methods import DictionaryConfig
from featureatlas.schemas.spec import InteractionsSpec
from featureatlas.tasks.interactions.data import Table, fit_reference, load_table, split_frame
from featureatlas.tasks.interactions.null import null_worlds
from featureatlas.tasks.interactions.plots import halo_plot, swarm_plot
from featureatlas.tasks.interactions.probe import LABEL_COLUMN, dictionary_frame
from featureatlas.tasks.interactions.rashomon import halo_ring
from featureatlas.tasks.interactions.score import score_pairs
from featureatlas.tasks.tracking.catalog import open_catalog
from featureatlas.tasks.tracking.identity import (
    dictionary_identity,
    file_digest,
    interactions_identity,
    ref_identity,
)
from featureatlas.tasks.tracking.mlflow_runs import StageRun
from featureatlas.tasks.tracking.stage import StageContext, run_stage

PLOTS = {"scaling": ("halo.png", "swarm.png"), "retraining": ("swarm_retrain.png",)}


def load_input(
    spec: InteractionsSpec, dictionary: DictionaryRef | None, cache: ActivationCacheRef | None
) -> Table:
    if spec.source == "table":
        return load_table(spec.table, spec.target, spec.task, spec.heldout_fraction, spec.seed)
    frame = dictionary_frame(
        dictionary.path,
        dictionary.hookpoint,
        cache.path,
        spec.label,
        spec.n_latents,
        spec.max_tokens,
        spec.seed,
        spec.heldout_fraction,
    )
    source = f"{dictionary.id} latents, label {spec.label}"
    return split_frame(frame, LABEL_COLUMN, source, "classification", spec.heldout_fraction, spec.seed)


def build_scores(spec: InteractionsSpec, folder: Path, table: Table) -> dict:
    """Write `scores.parquet` and the plots of the chosen classes into `folder`; return the ref's fields."""
    f = fit_reference(spec.reference, table, spec.seed)
    X, y = torch.as_tensor(table.X_test), torch.as_tensor(table.y_test)
    scaling = spec.model_class in ("scaling", "both")

    def refit(seed: int, rows: np.ndarray):
        return fit_reference(spec.reference, table, seed, rows)

    retrain = (refit, len(table.y_train), spec.n_retrain) if spec.model_class != "scaling" else None
    worlds = null_worlds(table, lambda t, s: fit_reference(spec.reference, t, s), spec.n_null, spec.seed)
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
        scaling=scaling,
        retrain=retrain,
        max_pairs=spec.max_pairs,
        ranking=spec.pair_ranking,
        null_worlds=worlds,
        null_z=spec.null_z,
    )
    scores.table.write_parquet(folder / "scores.parquet")
    top = list(scores.table.select("feature_i", "feature_j").head(spec.plot_pairs).iter_rows())
    names = [f"{a} x {b}" for a, b in top]
    index = {(table.features[i], table.features[j]): k for k, (i, j) in enumerate(scores.pairs)}
    bands = [(float(scores.null.low[index[t]]), float(scores.null.high[index[t]])) for t in top]
    if scaling:
        clouds = [scores.clouds[index[t]] for t in top]
        swarm_plot(clouds, scores.ref_loss, names, folder / "swarm.png", bands=bands)
        pair = scores.pairs[index[top[0]]]
        rings = [
            halo_ring(f, X, y, table.loss, rate, pair, spec.max_scale) for rate in sorted(spec.halo_rates)
        ]
        halo_plot(rings, top[0], folder / "halo.png")
    if scores.retrain_clouds:
        clouds = [scores.retrain_clouds[index[t]] for t in top]
        swarm_plot(
            clouds, scores.ref_loss, names, folder / "swarm_retrain.png", "retrained models", bands=bands
        )
    m = scores.multiplicity
    rs = scores.retrained
    facts = {
        "n_features": len(table.features),
        "n_pairs": scores.table.height,
        "n_interacting": int(scores.table["interacts"].sum()),
        "ref_loss": scores.ref_loss,
        "epsilon": scores.epsilon,
        "top_pair": list(top[0]),
        "features": table.features,
        "ambiguity": m.ambiguity if m else None,
        "discrepancy": m.discrepancy if m else None,
        "n_retrained": int(rs.kept.sum()) if rs is not None else None,
        "retrain_note": rs.reason if rs is not None else None,
    }
    range_column = "fis_range" if scaling else "retrain_fis_range"
    return facts | {"max_fis_range": float(scores.table[range_column].max())}


def resolve_dictionary(
    ctx: StageContext,
    spec: InteractionsSpec,
    cache: ActivationCacheRef | None,
    dictionaries: Sequence[DictionaryRef],
    jobs: Sequence[tuple[str, DictionaryConfig]],
) -> tuple[DictionaryRef, ActivationCacheRef]:
    """The dictionary to probe (this run's, by index into `jobs`, or any in the catalog, by id) and the
    cache it read. `dictionaries` may come in any order (sweeps train grouped): they are matched by id."""
    if not isinstance(spec.dictionary, str):
        hookpoint, cfg = jobs[spec.dictionary or 0]
        wanted = dictionary_identity(ref_identity(cache), hookpoint, cfg).id
        return next(d for d in dictionaries if d.id == wanted), cache
    made_here = {d.id: d for d in dictionaries}
    catalog = open_catalog(ctx.settings.catalog)
    if spec.dictionary in made_here:
        dictionary = made_here[spec.dictionary]
    else:
        found = catalog.get(spec.dictionary)
        if found is None or found[0] != "dictionary":
            what = "is not in the catalog" if found is None else f"is a {found[0]}, not a dictionary"
            raise ValueError(
                f"interactions.dictionary {spec.dictionary!r} {what}; list dictionaries with "
                "`featureatlas catalog list --kind dictionary`"
            )
        dictionary = DictionaryRef.model_validate(found[1].ref)
    if cache is None or cache.id != dictionary.cache_id:
        found = catalog.get(dictionary.cache_id)
        if found is None:
            raise ValueError(
                f"the activation cache {dictionary.cache_id} of {dictionary.id} is not in the catalog; run "
                "the pipeline that trained the dictionary again to rebuild it"
            )
        cache = ActivationCacheRef.model_validate(found[1].ref)
    for ref in (dictionary, cache):
        if not Path(ref.path).is_dir():
            raise ValueError(
                f"{ref.id}'s files are gone from {ref.path}; run the pipeline that made it again"
            )
    return dictionary, cache


def table_record(spec: InteractionsSpec) -> dict:
    """Where the table came from and its content hash: the table is not a catalog artifact, so the catalog
    row's config records it instead of a lineage edge."""
    if spec.source != "table":
        return {}
    if spec.table.startswith("sklearn:"):
        return {"table_path": spec.table, "scikit_learn": version("scikit-learn")}
    return {"table_path": spec.table, "table_sha256": file_digest(Path(spec.table))}


@task(name="score_interactions", cache_policy=NO_CACHE)
def score_interactions(
    ctx: StageContext,
    spec: InteractionsSpec,
    cache: ActivationCacheRef | None = None,
    dictionaries: Sequence[DictionaryRef] = (),
    jobs: Sequence[tuple[str, DictionaryConfig]] = (),
) -> InteractionScoresRef:
    """`dictionaries`: those this run trained; `jobs`: the spec's (hookpoint, config) list an index names."""
    parents, dictionary = [], None
    if spec.source == "dictionary":
        dictionary, cache = resolve_dictionary(ctx, spec, cache, dictionaries, jobs)
        parents = [dictionary, cache]
    ident = interactions_identity(spec, [ref_identity(p) for p in parents])
    source = spec.table if dictionary is None else f"{dictionary.id}:{spec.label}"

    def build(folder: Path, run: StageRun) -> tuple[dict, dict]:
        facts = build_scores(spec, folder, load_input(spec, dictionary, cache))
        metrics = {k: v for k, v in facts.items() if isinstance(v, float)}
        if facts["n_retrained"] is not None:
            metrics["n_retrained"] = float(facts["n_retrained"])
        metrics["n_interacting"] = float(facts["n_interacting"])
        run.log_metrics(metrics)
        for name in ("scores.parquet",) + sum((PLOTS[c] for c in _classes(spec)), ()):
            if (folder / name).exists():  # no swarm_retrain.png when no refit fits the bound
                run.log_artifact(folder / name)
        fields = {k: v for k, v in facts.items() if k != "max_fis_range"}
        columns = {"source": source, "reference": spec.reference, "n_features": facts["n_features"]}
        extra = {"dictionary_id": dictionary.id, "cache_id": cache.id} if dictionary else {}
        return fields | extra | {"spec": spec, "source": source}, columns | {"metrics": metrics}

    return run_stage(
        ctx,
        ident,
        InteractionScoresRef,
        name=f"score_interactions[{source}, {spec.reference}]",
        config=spec.model_dump(mode="json") | table_record(spec),
        parents=parents,
        build=build,
    )


def _classes(spec: InteractionsSpec) -> tuple[str, ...]:
    return {"scaling": ("scaling",), "retraining": ("retraining",), "both": ("scaling", "retraining")}[
        spec.model_class
    ]
