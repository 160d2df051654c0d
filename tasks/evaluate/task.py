"""Prefect task of stage 3: reconstruction, sparsity and CE-loss figures of a dictionary on held-out data."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from schemas.artifacts import ActivationCacheRef, DictionaryRef, EvalReport
from schemas.spec import EvaluateSpec
from tasks.common.models import load_model_ref
from tasks.common.store import ActivationCache
from tasks.dictionary import load_dictionary
from tasks.evaluate.ce_loss import ce_loss_score
from tasks.evaluate.metrics import reconstruction_metrics
from tasks.tracking.identity import evaluation_identity, ref_identity
from tasks.tracking.mlflow_runs import StageRun
from tasks.tracking.stage import StageContext, run_stage


def heldout_contexts(store: ActivationCache, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    ctx = store.contexts()
    idx = ctx["heldout"].bool().nonzero().squeeze(1)[:n]
    if idx.numel() == 0:
        raise ValueError("the cache has no held-out context; raise `corpus.heldout_fraction` above 0")
    return ctx["input_ids"][idx], ctx["attention_mask"][idx]


@task(name="evaluate_dictionary", cache_policy=NO_CACHE)
def evaluate_dictionary(
    ctx: StageContext, dictionary: DictionaryRef, cache: ActivationCacheRef, spec: EvaluateSpec
) -> EvalReport:
    ident = evaluation_identity(ref_identity(dictionary), ref_identity(cache), spec)

    def build(folder: Path, run: StageRun) -> tuple[dict, dict]:
        store = ActivationCache(cache.path)
        rows = store.select_rows("heldout")[: spec.max_tokens]
        if rows.numel() == 0:
            raise ValueError("the cache has no held-out tokens; raise `corpus.heldout_fraction` above 0")
        loaded = load_model_ref(cache.model.source, cache.model.spec, cache.model.path, cache.model.converted)
        sae = load_dictionary(dictionary.path, device=str(loaded.device))
        recon = reconstruction_metrics(sae, store.load(dictionary.hookpoint, rows), device=str(loaded.device))
        ids, mask = heldout_contexts(store, spec.ce_contexts)
        ce = ce_loss_score(
            loaded.model,
            sae,
            dictionary.hookpoint,
            ids,
            mask,
            batch_size=spec.batch_size,
            exclude_first_token=store.manifest["exclude_first_token"],
            device=str(loaded.device),
        )
        metrics = {
            "n_tokens": recon.n_tokens,
            "fvu": recon.fvu,
            "explained_variance": recon.explained_variance,
            "mse": recon.mse,
            "l0": recon.l0,
            "dead_fraction": recon.dead_fraction,
            "ce_loss_clean": ce.ce_loss_clean,
            "ce_loss_spliced": ce.ce_loss_spliced,
            "ce_loss_zero": ce.ce_loss_zero,
            "ce_loss_score": ce.ce_loss_score,
        }
        (folder / "eval.json").write_text(json.dumps(metrics, indent=1))
        run.log_metrics(metrics)
        run.log_artifact(folder / "eval.json")
        fields = {"dictionary_id": dictionary.id, "spec": spec, **metrics}
        return fields, {"dictionary_id": dictionary.id, "metrics": metrics}

    name = f"evaluate_dictionary[{dictionary.id}]"
    return run_stage(
        ctx,
        ident,
        EvalReport,
        name=name,
        config=spec.model_dump(mode="json"),
        parents=[dictionary, cache],
        build=build,
    )
