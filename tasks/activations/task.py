"""Prefect tasks of stage 1: register the model, prepare the corpus, cache activations."""

from __future__ import annotations

import json
import time
from pathlib import Path

import polars as pl
from prefect import task
from prefect.cache_policies import NO_CACHE

from schemas.artifacts import ActivationCacheRef, CorpusRef, ModelRef
from schemas.spec import CacheSpec, CorpusSpec, ModelSpec
from tasks.activations.cache import write_cache
from tasks.common.corpus import load_documents
from tasks.common.models import (
    describe,
    export_model,
    load_model,
    load_model_ref,
    resolve_source,
    source_files,
)
from tasks.tracking.identity import Identity, cache_identity, corpus_identity, model_identity, ref_identity
from tasks.tracking.mlflow_runs import StageRun
from tasks.tracking.stage import StageContext, run_stage


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
    """Read the corpus once into `documents.parquet` (doc_id, source, text, split)."""

    def build(folder: Path, run: StageRun) -> tuple[dict, dict]:
        docs = load_documents(spec)
        docs.write_parquet(folder / "documents.parquet")
        n_chars = int(docs["text"].str.len_chars().sum())
        run.log_metrics(
            {
                "n_documents": docs.height,
                "n_chars": n_chars,
                "n_heldout_documents": int((docs["split"] == "heldout").sum()),
            }
        )
        return {"spec": spec, "n_documents": docs.height, "n_chars": n_chars}, {
            "n_documents": docs.height,
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


@task(name="cache_activations", cache_policy=NO_CACHE)
def cache_activations(
    ctx: StageContext, model: ModelRef, corpus: CorpusRef, hookpoints: list[str], spec: CacheSpec
) -> ActivationCacheRef:
    """Run the model over the corpus and store activations at every hookpoint from one forward pass each."""
    ident = cache_identity(ref_identity(model), ref_identity(corpus), hookpoints, spec)

    def build(folder: Path, run: StageRun) -> tuple[dict, dict]:
        loaded = load_model_ref(model.source, model.spec, model.path, model.converted)
        docs = pl.read_parquet(Path(corpus.path) / "documents.parquet")
        t0 = time.perf_counter()
        header = {
            "model_id": model.id,
            "model_fingerprint": model.fingerprint,
            "corpus_id": corpus.id,
            "corpus_fingerprint": corpus.fingerprint,
        }
        summary = write_cache(
            loaded, docs, corpus.spec, spec, hookpoints, folder, header=header, progress=ctx.progress
        )
        seconds = time.perf_counter() - t0
        m = summary.manifest
        run.log_metrics(
            {
                "n_tokens": summary.n_tokens,
                "n_contexts": summary.n_contexts,
                "n_train_tokens": m["n_train_tokens"],
                "n_heldout_tokens": m["n_heldout_tokens"],
                "seconds": seconds,
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
