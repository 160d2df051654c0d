"""Prefect tasks of stage 1: register the model, prepare the corpus, cache activations.

Caching fans out: `cache_activations` plans the parts (`cache.parts`), runs them and assembles the cache once
all are done; only then does `run_stage` register it. Every part hooks the language model, and a process
holds one copy of it (`load_model` caches it), so without Dask the parts run in turn in the stage's process
(on threads two parts would see each other's hooks, and a copy per thread would double the memory for cores
torch already uses); on a Dask cluster one `cache_part` task per part goes through the settings' task runner
(`tasks.tracking.fanout.task_pool`), each worker process loads the model itself from the registered
reference (a loaded model is never pickled), and the parts run at once, writing into the stage's folder,
which every worker must see.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import wait
from pathlib import Path

import polars as pl
from prefect import task
from prefect.cache_policies import NO_CACHE

from featureatlas.schemas.artifacts import ActivationCacheRef, CorpusRef, ModelRef
from featureatlas.schemas.spec import CacheSpec, CorpusSpec, ModelSpec
from featureatlas.tasks.activations.cache import (
    CacheSummary,
    assemble,
    plan_cache,
    prepare_cache,
    start_token_table,
    write_part,
)
from featureatlas.tasks.activations.unstored import write_unstored
from featureatlas.tasks.common.contexts import open_contexts
from featureatlas.tasks.common.documents import write_documents
from featureatlas.tasks.common.models import (
    describe,
    export_model,
    load_model,
    load_model_ref,
    resolve_source,
    source_files,
)
from featureatlas.tasks.tracking.fanout import task_pool
from featureatlas.tasks.tracking.identity import (
    Identity,
    cache_identity,
    corpus_identity,
    model_identity,
    ref_identity,
)
from featureatlas.tasks.tracking.mlflow_runs import StageRun
from featureatlas.tasks.tracking.stage import StageContext, run_stage


def model_ident(spec: ModelSpec, online: bool) -> tuple[str, Identity]:
    source = resolve_source(spec, online)
    return source, model_identity(spec, source_files(source, spec.gguf_file), source)


@task(name="register_model", cache_policy=NO_CACHE)
def register_model(ctx: StageContext, spec: ModelSpec) -> ModelRef:
    """Identify the model by content; a GGUF checkpoint is dequantised once into a fast-loading copy."""
    source, ident = model_ident(spec, ctx.settings.online)

    def build(folder: Path, run: StageRun) -> tuple[dict, dict]:
        t0 = time.perf_counter()
        loaded = export_model(source, spec, folder) if spec.gguf_file else load_model(source, spec)
        info = describe(loaded.model)
        (folder / "model.json").write_text(json.dumps({"source": source, **info}, indent=1))
        run.log_metrics({"load_seconds": time.perf_counter() - t0})
        fields = {"spec": spec, "source": source, "converted": bool(spec.gguf_file), **info}
        columns = {"source": source, **{k: info[k] for k in ("architecture", "n_layers", "d_model")}}
        return fields, columns

    return run_stage(
        ctx,
        ident,
        ModelRef,
        name="register_model",
        config=spec.model_dump(mode="json"),
        parents=[],
        build=build,
    )


@task(name="prepare_corpus", cache_policy=NO_CACHE)
def prepare_corpus(ctx: StageContext, spec: CorpusSpec) -> CorpusRef:
    """Read the corpus once into `documents.parquet` (doc_id, source, text, split), a bucket at a time."""

    def build(folder: Path, run: StageRun) -> tuple[dict, dict]:
        counts = write_documents(spec, folder / "documents.parquet")
        run.log_metrics(counts)
        n_docs, n_chars = counts["n_documents"], counts["n_chars"]
        return {"spec": spec, "n_documents": n_docs, "n_chars": n_chars}, {
            "n_documents": n_docs,
            "n_chars": n_chars,
        }

    return run_stage(
        ctx,
        corpus_identity(spec),
        CorpusRef,
        name="prepare_corpus",
        config=spec.model_dump(mode="json"),
        parents=[],
        build=build,
    )


def _cache_header(model: ModelRef, corpus: CorpusRef) -> dict:
    return {
        "model_id": model.id,
        "model_fingerprint": model.fingerprint,
        "corpus_id": corpus.id,
        "corpus_fingerprint": corpus.fingerprint,
    }


@task(name="cache_part", cache_policy=NO_CACHE)
def cache_part(
    model: ModelRef,
    corpus: CorpusRef,
    hookpoints: list[str],
    spec: CacheSpec,
    folder: str,
    part: int,
    progress: bool = False,
) -> int:
    """Write the shards of one part of a cache into `folder` (prepared by `cache_activations`); returns
    the batches it ran. Everything comes as references, so a Dask worker loads the model itself and reads
    the contexts `cache_activations` built into the folder."""
    loaded = load_model_ref(model.source, model.spec, model.path, model.converted)
    contexts = open_contexts(Path(folder) / "contexts.safetensors")
    header = _cache_header(model, corpus)
    plan = plan_cache(loaded, None, corpus.spec, spec, hookpoints, header=header, contexts=contexts)
    return write_part(loaded, plan, spec, Path(folder), part, progress=progress)


@task(name="cache_activations", cache_policy=NO_CACHE)
def cache_activations(
    ctx: StageContext, model: ModelRef, corpus: CorpusRef, hookpoints: list[str], spec: CacheSpec
) -> ActivationCacheRef:
    """Run the model over the corpus and store activations at every hookpoint from one forward pass each.

    With `spec.store` false only the token table and contexts are written; later stages recompute the
    activations from the model (`tasks.common.recompute`)."""
    ident = cache_identity(ref_identity(model), ref_identity(corpus), hookpoints, spec)

    def _registered(
        run: StageRun, folder: Path, summary: CacheSummary, seconds: float, batches: list[int], parts: int
    ) -> tuple[dict, dict]:
        m = summary.manifest
        run.log_metrics(
            {
                "n_tokens": summary.n_tokens,
                "n_contexts": summary.n_contexts,
                "n_train_tokens": m["n_train_tokens"],
                "n_heldout_tokens": m["n_heldout_tokens"],
                "seconds": seconds,
                "parts": parts,
                "batches": sum(batches),  # fewer than a full run's when it resumed
                "tokens_per_second": summary.n_tokens / max(seconds, 1e-9),
            }
        )
        run.log_artifact(folder / "manifest.json")
        fields = {
            "model": model,
            "corpus": corpus,
            "spec": spec,
            "hookpoints": hookpoints,
            "d_in": summary.d_in,
            "n_tokens": summary.n_tokens,
            "n_contexts": summary.n_contexts,
            "context_length": corpus.spec.context_length,
        }
        columns = {
            "model_id": model.id,
            "corpus_id": corpus.id,
            "hookpoints": hookpoints,
            "n_tokens": summary.n_tokens,
        }
        return fields, columns

    def build(folder: Path, run: StageRun) -> tuple[dict, dict]:
        loaded = load_model_ref(model.source, model.spec, model.path, model.converted)
        documents = Path(corpus.path) / "documents.parquet"
        docs = pl.read_parquet(documents, columns=["doc_id"])  # for the token table; texts come in batches
        t0 = time.perf_counter()
        header = _cache_header(model, corpus)
        plan = plan_cache(loaded, documents, corpus.spec, spec, hookpoints, header=header, folder=folder)
        if not spec.store:
            how = {"source": model.source, "spec": model.spec.model_dump(mode="json")}
            how |= {"path": model.path, "converted": model.converted}
            summary = write_unstored(loaded, docs, plan, spec, folder, header=header, model_load=how)
            return _registered(run, folder, summary, time.perf_counter() - t0, [0], len(plan.parts))
        prepare_cache(plan, folder)
        table = start_token_table(loaded.tokenizer, docs, plan, spec, folder)  # while the model runs
        verified: dict[str, set[int]] = {}  # shards hashed in this process: the assembly does not reread them
        try:
            batches = _run_parts(ctx, model, corpus, hookpoints, spec, loaded, plan, folder, verified)
        except BaseException:
            wait([table])  # the table's thread writes into the folder: it ends before the error goes up
            raise
        summary = assemble(
            loaded.tokenizer, docs, plan, spec, folder, header=header, token_table=table, verified=verified
        )
        return _registered(run, folder, summary, time.perf_counter() - t0, batches, len(plan.parts))

    return run_stage(
        ctx,
        ident,
        ActivationCacheRef,
        name="cache_activations",
        config={"hookpoints": hookpoints, **spec.model_dump(mode="json")},
        parents=[model, corpus],
        build=build,
        resumable=True,  # a killed run resumes from its last complete shard
    )


def _run_parts(
    ctx: StageContext,
    model: ModelRef,
    corpus: CorpusRef,
    hookpoints: list[str],
    spec: CacheSpec,
    loaded,
    plan,
    folder: Path,
    verified: dict[str, set[int]],
) -> list[int]:
    """Every part of the cache, here in turn or on the Dask cluster; the batches each ran."""
    if len(plan.parts) == 1 or ctx.settings.task_runner != "dask":
        # in this process, with the plan made above: one job starts no cluster, and on threads the parts
        # would run in turn anyway (they hook the one loaded model)
        return [
            write_part(loaded, plan, spec, folder, p, progress=ctx.progress, verified=verified)
            for p in range(len(plan.parts))
        ]
    calls = [
        {"model": model, "corpus": corpus, "hookpoints": hookpoints, "spec": spec, "folder": str(folder)}
        | {"part": p, "progress": ctx.progress}
        for p in range(len(plan.parts))
    ]
    with task_pool(ctx.settings) as pool:
        return pool.run_all(cache_part, calls)
