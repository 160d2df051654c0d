"""Prefect task of stage 2: train one dictionary on one hookpoint of an activation cache."""

from __future__ import annotations

import time
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from schemas.artifacts import ActivationCacheRef, DictionaryRef
from schemas.methods import DictionaryConfig
from tasks.common.store import ActivationCache
from tasks.dictionary.train import train_dictionary as fit
from tasks.tracking.identity import dictionary_identity, ref_identity
from tasks.tracking.mlflow_runs import StageRun
from tasks.tracking.stage import StageContext, run_stage, stage_logger


@task(name="train_dictionary", cache_policy=NO_CACHE)
def train_dictionary(
    ctx: StageContext, cache: ActivationCacheRef, hookpoint: str, cfg: DictionaryConfig
) -> DictionaryRef:
    """Train on the cache's training split (held-out documents are never seen here)."""
    ident = dictionary_identity(ref_identity(cache), hookpoint, cfg)
    name = f"train_dictionary[{cfg.method}, {hookpoint}]"

    def build(folder: Path, run: StageRun) -> tuple[dict, dict]:
        store = ActivationCache(cache.path)
        rows = store.select_rows("train")
        acts = store.load(hookpoint, rows)
        targets = None
        if cfg.target_hookpoint is not None:  # a transcoder: the same tokens at its target site
            if cfg.target_hookpoint not in store.manifest["hookpoints"]:
                raise ValueError(
                    f"transcoder target {cfg.target_hookpoint!r} is not in cache {cache.id}, which holds "
                    f"{sorted(store.manifest['hookpoints'])}; add it to the spec's hookpoints and cache again"
                )
            targets = store.load(cfg.target_hookpoint, rows)
        t0 = time.perf_counter()
        log = stage_logger()

        def on_metrics(metrics: dict[str, float], step: int) -> None:
            run.log_metrics(metrics, step)
            if step % (cfg.log_every * 5) == 0:
                log.info(
                    "step %d: fvu %.4f l0 %.1f dead %.3f",
                    step,
                    metrics["fvu"],
                    metrics["l0"],
                    metrics["dead_fraction"],
                )

        result = fit(cfg, acts, on_metrics=on_metrics, progress=ctx.progress, targets=targets)
        seconds = time.perf_counter() - t0
        result.dictionary.save(folder)
        run.log_metrics({"train_seconds": seconds, "train_tokens": acts.shape[0]})
        run.log_artifact(folder / "cfg.json")
        d = result.dictionary
        fields = {
            "cache_id": cache.id,
            "hookpoint": hookpoint,
            "config": cfg,
            "d_in": d.d_in,
            "d_sae": d.d_sae,
            "final_metrics": result.final_metrics,
        }
        columns = {
            "cache_id": cache.id,
            "method": cfg.method,
            "hookpoint": hookpoint,
            "d_in": d.d_in,
            "d_sae": d.d_sae,
        }
        return fields, columns

    config = cfg.model_dump(mode="json") | {"hookpoint": hookpoint}
    return run_stage(ctx, ident, DictionaryRef, name=name, config=config, parents=[cache], build=build)
