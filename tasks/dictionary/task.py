"""Prefect task of stage 2: train the dictionaries of one hookpoint (a sweep) from one streamed pass.

Every dictionary is still its own stage: its own fingerprint, nested MLflow run, folder and catalog row.
Those already in the catalog are reused, never retrained; the rest that can share a pass (`sweep_key`) train
together. Each builds resumably in `<id>.partial/`: checkpoints go to its `checkpoints/` subfolder, and after
a kill the next run resumes there and continues the same MLflow run. A failed or killed sweep registers
nothing; each dictionary keeps its last good checkpoint. A dictionary with `nproc_per_node` > 1 trains alone
in a torchrun launch (`tasks.dictionary.launch`), without checkpoints, and is registered the same way.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from featureatlas.schemas.artifacts import ActivationCacheRef, DictionaryRef
from featureatlas.schemas.methods import DictionaryConfig
from featureatlas.tasks.common.store import ActivationCache
from featureatlas.tasks.dictionary.data import BadActivations, CacheSource, seen_record
from featureatlas.tasks.dictionary.launch import train_with_torchrun
from featureatlas.tasks.dictionary.paired import PairedSource
from featureatlas.tasks.dictionary.train import MetricsCallback, TrainResult, sweep_key, train_dictionaries
from featureatlas.tasks.tracking.identity import Identity, dictionary_identity, ref_identity
from featureatlas.tasks.tracking.mlflow_runs import StageRun
from featureatlas.tasks.tracking.stage import StageContext, artifact_exists, run_stage, stage_logger

CHECKPOINTS = "checkpoints"
DATA_PARALLEL = "torchrun"  # the launch's config, metrics and rank 0's output, inside the partial folder


def sweep_groups(jobs: list[tuple[str, DictionaryConfig]]) -> list[tuple[str, list[DictionaryConfig]]]:
    """(hookpoint, configs) groups, each trainable from one pass, in the order the jobs first name them."""
    groups: dict[tuple, tuple[str, list[DictionaryConfig]]] = {}
    for hookpoint, cfg in jobs:
        groups.setdefault((hookpoint, sweep_key(cfg)), (hookpoint, []))[1].append(cfg)
    return list(groups.values())


def _stage_name(cfg: DictionaryConfig, hookpoint: str) -> str:
    return f"train_dictionary[{cfg.method}, {hookpoint}]"


def _source(cache: ActivationCacheRef, hookpoint: str) -> CacheSource:
    source = CacheSource(ActivationCache(cache.path), hookpoint)
    expected = cache.d_in.get(hookpoint)
    if expected is not None and expected != source.d_in:
        raise BadActivations(
            f"the catalog records d_in={expected} for {hookpoint!r} of cache {cache.id}, but its manifest "
            f"says {source.d_in}; the cache folder {cache.path} was replaced: delete it and run again"
        )
    return source


class _Sweep:
    """The dictionaries of one pass: nested run_stage calls, and one training run in the innermost."""

    def __init__(
        self, ctx: StageContext, cache: ActivationCacheRef, hookpoint: str, cfgs: list[DictionaryConfig]
    ) -> None:
        self.ctx, self.cache, self.hookpoint = ctx, cache, hookpoint
        self.cfgs = dict(enumerate(cfgs))
        self.slots: dict[int, tuple[Path, StageRun]] = {}
        self.fields: dict[int, tuple[dict, dict]] = {}
        self.refs: dict[int, DictionaryRef] = {}

    def run(self, members: list[tuple[int, DictionaryConfig, Identity]]) -> None:
        """Open the stage of members[0]; inside its build, the rest; the last one trains them all."""
        if not members:
            self._train()
            return
        (i, cfg, ident), rest = members[0], members[1:]

        def build(folder: Path, run: StageRun) -> tuple[dict, dict]:
            self.slots[i] = (folder, run)
            self.run(rest)
            return self.fields[i]

        config = cfg.model_dump(mode="json") | {"hookpoint": self.hookpoint}
        self.refs[i] = run_stage(
            self.ctx,
            ident,
            DictionaryRef,
            name=_stage_name(cfg, self.hookpoint),
            config=config,
            parents=[self.cache],
            build=build,
            resumable=True,
            same_run=True,
        )
        if i not in self.slots:  # another process registered it meanwhile: reused, so go on without it
            self.run(rest)

    def _train(self) -> None:
        order = sorted(self.slots)
        if not order:
            return
        cfgs = [self.cfgs[i] for i in order]
        source = _source(self.cache, self.hookpoint)
        target = cfgs[0].target_hookpoint  # one per pass (sweep_key): a transcoder's target site
        if target is not None:
            if target not in self.cache.hookpoints:
                raise BadActivations(
                    f"transcoder target {target!r} is not in cache {self.cache.id}, which holds "
                    f"{self.cache.hookpoints}; add it to the spec's hookpoints and cache again"
                )
            source = PairedSource(source, _source(self.cache, target))
        log = stage_logger()

        def on_metrics(i: int) -> MetricsCallback:
            run, every = self.slots[i][1], self.cfgs[i].log_every * 5

            def log_metrics(metrics: dict[str, float], step: int) -> None:
                run.log_metrics(metrics, step)
                if step % every == 0:
                    log.info(
                        "%s step %d: fvu %.4f l0 %.1f dead %.3f",
                        _stage_name(self.cfgs[i], self.hookpoint),
                        step,
                        metrics["fvu"],
                        metrics["l0"],
                        metrics["dead_fraction"],
                    )

            return log_metrics

        t0 = time.perf_counter()
        if cfgs[0].nproc_per_node > 1:  # alone in its group (sweep_key)
            (i,) = order
            workdir = self.slots[i][0] / DATA_PARALLEL
            name, nproc = _stage_name(cfgs[0], self.hookpoint), cfgs[0].nproc_per_node
            log.info("%s: data-parallel in %d torchrun processes", name, nproc)
            results = [
                train_with_torchrun(
                    cfgs[0], Path(self.cache.path), self.hookpoint, workdir, on_metrics=on_metrics(i)
                )
            ]
            shutil.rmtree(workdir)
        else:
            results = train_dictionaries(
                cfgs,
                source,
                on_metrics=[on_metrics(i) for i in order],
                checkpoint_dirs=[self.slots[i][0] / CHECKPOINTS for i in order],
                progress=self.ctx.progress,
            )
        seconds = time.perf_counter() - t0
        for i, result in zip(order, results):
            self.fields[i] = self._save(i, result, seconds, source.n_rows)
            seen = seen_record(source, result.steps, self.cfgs[i].batch_size)
            if seen is not None:  # trained on forward passes: record what the dictionary saw
                (self.slots[i][0] / "seen.json").write_text(json.dumps(seen))
                self.slots[i][1].log_metrics({"forward_tokens": seen["forward_tokens"]})

    def _save(self, i: int, result: TrainResult, seconds: float, tokens: int) -> tuple[dict, dict]:
        folder, run = self.slots[i]
        cfg, d = self.cfgs[i], result.dictionary
        d.save(folder)
        shutil.rmtree(folder / CHECKPOINTS, ignore_errors=True)  # after the save: a kill between resumes
        # a sweep's wall time is shared: each member's figure is the whole pass
        run.log_metrics({"train_seconds": seconds, "train_tokens": tokens})
        run.log_artifact(folder / "cfg.json")
        common = {"cache_id": self.cache.id, "hookpoint": self.hookpoint, "d_in": d.d_in, "d_sae": d.d_sae}
        fields = common | {"config": cfg, "final_metrics": result.final_metrics}
        return fields, common | {"method": cfg.method}


@task(name="train_dictionaries", cache_policy=NO_CACHE)
def train_dictionaries_task(
    ctx: StageContext, cache: ActivationCacheRef, hookpoint: str, cfgs: list[DictionaryConfig]
) -> list[DictionaryRef]:
    """Train `cfgs` on the cache's training split of `hookpoint` (held-out documents are never seen here).

    The configs must share a `sweep_key` (see `sweep_groups`); the refs come back in the order of `cfgs`.
    """
    sweep = _Sweep(ctx, cache, hookpoint, cfgs)
    idents = [dictionary_identity(ref_identity(cache), hookpoint, cfg) for cfg in cfgs]
    fresh = []
    for i, (cfg, ident) in enumerate(zip(cfgs, idents)):
        if artifact_exists(ctx.settings, ident):
            sweep.run([(i, cfg, ident)])  # finds it in the catalog: logs the reuse, trains nothing
        else:
            fresh.append((i, cfg, ident))
    sweep.run(fresh)
    return [sweep.refs[i] for i in range(len(cfgs))]


@task(name="train_dictionary", cache_policy=NO_CACHE)
def train_dictionary(
    ctx: StageContext, cache: ActivationCacheRef, hookpoint: str, cfg: DictionaryConfig
) -> DictionaryRef:
    """Train one dictionary: a sweep of one."""
    return train_dictionaries_task.fn(ctx, cache, hookpoint, [cfg])[0]
