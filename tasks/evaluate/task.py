"""Prefect task of stage 3: reconstruction, sparsity, CE-loss, causal and geometric figures of a dictionary on
held-out data (and, when asked, against a supervised reference dictionary on the indirect-object task). The
headline figures go to the report's flat fields and MLflow metrics; the rest (histogram, ablations, steering,
geometry, supervised) to `EvalReport.details` and `eval.json`."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from featureatlas.schemas.artifacts import ActivationCacheRef, DictionaryRef, EvalReport
from featureatlas.schemas.evaluation import EvalDetails
from featureatlas.schemas.spec import EvaluateSpec
from featureatlas.tasks.common.models import load_model_ref
from featureatlas.tasks.common.progress import StageProgress
from featureatlas.tasks.common.store import ActivationCache
from featureatlas.tasks.dictionary import load_dictionary
from featureatlas.tasks.evaluate.ablation import ablate_latents, most_frequent_latents
from featureatlas.tasks.evaluate.ce_loss import ce_loss_score
from featureatlas.tasks.evaluate.compatibility import check_dictionary_fits
from featureatlas.tasks.evaluate.geometry import atomic_geometry, decoder_geometry
from featureatlas.tasks.evaluate.metrics import reconstruction_metrics
from featureatlas.tasks.evaluate.steering import steer_latent
from featureatlas.tasks.evaluate.supervised import supervised_evaluation
from featureatlas.tasks.evaluate.templates import ioi_task
from featureatlas.tasks.tracking.catalog import open_catalog
from featureatlas.tasks.tracking.identity import evaluation_identity, ref_identity
from featureatlas.tasks.tracking.mlflow_runs import StageRun
from featureatlas.tasks.tracking.stage import StageContext, run_stage, stage_logger

# rough shares of an evaluation's time, for the progress bar's ETA
PHASES = {"reconstruction": 1, "CE-loss score": 3, "ablation and steering": 3, "geometry and supervised": 1}


def heldout_contexts(store: ActivationCache, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `n` held-out contexts' token ids and attention masks, read as slices of the contexts file:
    one flag per context is read whole, the token ids only of the contexts taken."""
    from safetensors import safe_open

    with safe_open(str(store.folder / "contexts.safetensors"), "pt") as f:
        idx = f.get_slice("heldout")[:].bool().nonzero().squeeze(1)[:n]
        if idx.numel() == 0:
            raise ValueError("the cache has no held-out context; raise `corpus.heldout_fraction` above 0")
        ids, mask = f.get_slice("input_ids"), f.get_slice("attention_mask")
        return (
            torch.cat([ids[i : i + 1] for i in idx.tolist()]),
            torch.cat([mask[i : i + 1] for i in idx.tolist()]),
        )


def _site_mean(
    store: ActivationCache, site: str, rows: torch.Tensor, acts: torch.Tensor | None
) -> torch.Tensor:
    """The per-dimension mean that mean ablation splices in: the cache's own (float64, every row), or for an
    unstored cache, which never saw every row, the mean of the held-out rows evaluated."""
    info = store.manifest["hookpoints"][site]
    if "mean" in info:
        return torch.tensor(info["mean"])
    acts = store.load(site, rows) if acts is None else acts
    return acts.double().mean(0).float()


def trained_model_id(ctx: StageContext, dictionary: DictionaryRef) -> str | None:
    """The model id of the cache the dictionary was trained on, from the catalog (None if not catalogued)."""
    found = open_catalog(ctx.settings.catalog).get(dictionary.cache_id)
    return None if found is None else found[1].ref["model"]["id"]


def causal_figures(
    loaded, sae, hookpoint: str, ids, mask, spec: EvaluateSpec, exclude_first: bool, target: str | None = None
) -> dict:
    """Ablation and steering of the most frequent latents on a few held-out contexts.

    For a transcoder (`target` set) latents are read at `hookpoint`, removed and steered at `target`.
    """
    n = max(spec.ablation_latents, spec.steering_latents)
    if n == 0:
        return {"ablations": [], "steering": []}
    ids, mask = (
        ids[: spec.ablation_contexts].to(loaded.device),
        mask[: spec.ablation_contexts].to(loaded.device),
    )
    latents = most_frequent_latents(loaded.model, sae, hookpoint, ids, mask, n)
    ablations = ablate_latents(
        loaded.model,
        sae,
        target or hookpoint,
        ids,
        mask,
        latents[: spec.ablation_latents],
        exclude_first_token=exclude_first,
        source_hookpoint=None if target is None else hookpoint,
    )
    prompt = loaded.tokenizer(spec.steering_prompt, return_tensors="pt")["input_ids"].to(loaded.device)
    steering = [
        steer_latent(
            loaded.model,
            sae,
            target or hookpoint,
            prompt,
            j,
            sign=sign,
            target_kl=spec.steering_target_kl,
            tolerance=spec.steering_tolerance,
            n_new_tokens=spec.steering_new_tokens,
            tokenizer=loaded.tokenizer,
        )
        for j in latents[: spec.steering_latents]
        for sign in (1, -1)
    ]
    return {"ablations": ablations, "steering": steering}


def supervised_figures(loaded, sae, hookpoint: str, spec: EvaluateSpec):
    """The dictionary against mean codes on the indirect-object task (None when switched off)."""
    if spec.supervised_prompts == 0:
        return None
    task = ioi_task()
    return supervised_evaluation(
        loaded.model,
        loaded.tokenizer,
        sae,
        hookpoint,
        task,
        task.sample(spec.supervised_prompts),
        batch_size=spec.batch_size,
        device=loaded.device,
    )


@task(name="evaluate_dictionary", cache_policy=NO_CACHE)
def evaluate_dictionary(
    ctx: StageContext,
    dictionary: DictionaryRef,
    cache: ActivationCacheRef,
    spec: EvaluateSpec,
    hookpoint: str | None = None,
) -> EvalReport:
    """Evaluate `dictionary` at `hookpoint` (default: its own) on `cache`'s held-out data and model."""
    hookpoint = hookpoint or dictionary.hookpoint
    check_dictionary_fits(dictionary, cache, hookpoint, trained_model_id(ctx, dictionary), force=spec.force)
    # A transcoder reads `hookpoint` and writes its target: the target's activations are what it must match,
    # and the target's output is what the spliced run replaces.
    target = dictionary.config.target_hookpoint
    if target is not None and target not in cache.hookpoints:
        raise ValueError(
            f"transcoder target {target!r} is not in cache {cache.id}, which holds {cache.hookpoints}; "
            "evaluate on a cache of both hookpoints"
        )
    ident = evaluation_identity(ref_identity(dictionary), ref_identity(cache), spec)

    def build(folder: Path, run: StageRun) -> tuple[dict, dict]:
        with StageProgress(f"evaluate {dictionary.id}", PHASES, ctx.progress, stage_logger()) as progress:
            return measure(folder, run, progress)

    def measure(folder: Path, run: StageRun, progress: StageProgress) -> tuple[dict, dict]:
        progress.step("reconstruction")
        store = ActivationCache(cache.path)
        rows = store.select_rows("heldout", limit=spec.max_tokens)
        if rows.numel() == 0:
            raise ValueError("the cache has no held-out tokens; raise `corpus.heldout_fraction` above 0")
        loaded = load_model_ref(cache.model.source, cache.model.spec, cache.model.path, cache.model.converted)
        sae = load_dictionary(dictionary.path, device=str(loaded.device))
        if not store.stored:  # the held-out rows are recomputed from this model, shard by shard
            store.attach_model(loaded)
        acts = store.load(hookpoint, rows)
        recon = reconstruction_metrics(
            sae,
            acts,
            device=str(loaded.device),
            dense_threshold=spec.dense_threshold,
            hist_bins_per_decade=spec.hist_bins_per_decade,
            targets=None if target is None else store.load(target, rows),
        )
        progress.step("CE-loss score")
        ids, mask = heldout_contexts(store, spec.ce_contexts)
        exclude_first = store.manifest["exclude_first_token"]
        site = target or hookpoint
        mean = (
            _site_mean(store, site, rows, acts if site == hookpoint else None) if spec.mean_ablation else None
        )
        ce = ce_loss_score(
            loaded.model,
            sae,
            site,
            ids,
            mask,
            batch_size=spec.batch_size,
            exclude_first_token=exclude_first,
            device=str(loaded.device),
            mean=mean,
            source_hookpoint=None if target is None else hookpoint,
        )
        progress.step("ablation and steering")
        causes = causal_figures(loaded, sae, hookpoint, ids, mask, spec, exclude_first, target)
        progress.step("geometry and supervised")
        details = EvalDetails(
            **recon.model_dump(include=set(EvalDetails.model_fields)),
            **ce.model_dump(include=set(EvalDetails.model_fields)),
            **causes,
            geometry=decoder_geometry(sae),
            atomic_geometry=atomic_geometry(sae, acts, recon.l0, ridge=spec.geometry_ridge),
            supervised=supervised_figures(loaded, sae, hookpoint, spec),
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
        # MLflow takes numbers only: the scalar details join the headline metrics, lists stay in eval.json.
        scalars = {
            k: v
            for k, v in details.model_dump().items()
            if isinstance(v, float | int) and not isinstance(v, bool)
        }
        scalars |= {f"geometry_euclidean_{k}": v for k, v in details.geometry.model_dump().items()}
        scalars |= {f"geometry_atomic_{k}": v for k, v in details.atomic_geometry.model_dump().items()}
        if details.supervised is not None:
            scalars |= {
                f"ioi_{k}": v
                for k, v in details.supervised.model_dump().items()
                if isinstance(v, float) and k != "n_prompts"
            }
        if details.ablations:
            scalars["ablation_max_loss_change"] = abs(details.ablations[0].loss_change)
        if details.steering:
            scalars["steering_reached_fraction"] = sum(s.reached for s in details.steering) / len(
                details.steering
            )
        report = {**metrics, "hookpoint": hookpoint, "details": details.model_dump(mode="json")}
        if target is not None:
            report["target_hookpoint"] = target
        (folder / "eval.json").write_text(json.dumps(report, indent=1))
        run.log_metrics(metrics | scalars)
        run.log_artifact(folder / "eval.json")
        fields = {"dictionary_id": dictionary.id, "spec": spec, **metrics, "details": details}
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
