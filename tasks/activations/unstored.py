"""An unstored cache (`cache.store: false`): the token table and contexts of a cache, without its shards.

Nothing but one short forward pass (to learn each hookpoint's width) runs here. The manifest says
`stored: false`, lists each hookpoint's shards by their row counts alone, and records how to load the model
(`model_load`) and the batch size of the forward passes, so `ActivationCache` can recompute any shard from the
model with the bytes a stored cache would hold (`tasks.common.recompute`). Training then streams forward
passes into the dictionaries; evaluation and labeling recompute the rows they need.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from featureatlas.schemas.spec import CacheSpec
from featureatlas.tasks.activations.cache import CachePlan, CacheSummary, finish_cache
from featureatlas.tasks.common.hooks import capture_activations
from featureatlas.tasks.common.models import LoadedModel

if TYPE_CHECKING:
    import polars as pl

log = logging.getLogger(__name__)


def write_unstored(
    loaded: LoadedModel,
    documents: pl.DataFrame | None,
    plan: CachePlan,
    cache: CacheSpec,
    out_dir: Path,
    *,
    header: dict,
    model_load: dict | None = None,
    token_table: bool = True,
) -> CacheSummary:
    """Write an unstored cache of `plan` into `out_dir`.

    `model_load` ({source, spec, path, converted} of the registered model) lets later stages load the model
    themselves; without it, readers must `attach_model` a loaded one.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    model, _, device = loaded
    hookpoints, T = plan.key["hookpoints"], cache.shard_tokens
    ids, mask = plan.contexts.ids(0, 1), plan.contexts.mask(0, 1)
    with torch.inference_mode():
        acts = capture_activations(model, hookpoints, ids.to(device), mask.to(device))
    n_shards = -(-plan.n_rows // T)
    shards = [{"rows": min(T, plan.n_rows - s * T)} for s in range(n_shards)]
    hp_info = {
        hp: {"d_in": int(acts[hp].shape[-1]), "rows": plan.n_rows, **plan.sites[hp].layout()}
        | {"shards": shards}
        for hp in hookpoints
    }
    log.info("unstored cache: %d rows, %d shards of %s", plan.n_rows, n_shards, hookpoints)
    extra = {"stored": False, "batch_size": cache.batch_size, "model_load": model_load}
    return finish_cache(
        loaded.tokenizer,
        documents,
        plan,
        cache,
        out_dir,
        header=header,
        hookpoints=hp_info,
        extra=extra,
        token_table=token_table,
    )
