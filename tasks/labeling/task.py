"""Prefect task of stage 4: the feature table (contexts, statistics, labels, scores) and its HTML atlas."""

from __future__ import annotations

from pathlib import Path

import polars as pl
from prefect import task
from prefect.cache_policies import NO_CACHE

from featureatlas.schemas.artifacts import ActivationCacheRef, DictionaryRef, LabelingRef
from featureatlas.schemas.spec import LabelSpec
from featureatlas.tasks.common.models import load_model_ref, resolve_device
from featureatlas.tasks.common.progress import StageProgress
from featureatlas.tasks.common.store import ActivationCache
from featureatlas.tasks.dictionary import load_dictionary
from featureatlas.tasks.labeling.atlas import write_atlas
from featureatlas.tasks.labeling.corpus import CacheRows
from featureatlas.tasks.labeling.features import Unembedding, feature_table
from featureatlas.tasks.labeling.llm_labels import build_labeler
from featureatlas.tasks.labeling.scoring import load_minilm
from featureatlas.tasks.labeling.sharded import ShardRows
from featureatlas.tasks.labeling.top_contexts import write_feature_table
from featureatlas.tasks.tracking.identity import labeling_identity, ref_identity
from featureatlas.tasks.tracking.mlflow_runs import StageRun
from featureatlas.tasks.tracking.stage import StageContext, run_stage, stage_logger

# rough shares of a labeling's time, for the progress bar's ETA
PHASES = {"loading": 1, "feature statistics and labels": 8, "writing the table and atlas": 1}
BATCH_ROWS = 4096  # activation rows encoded at a time


@task(name="label_features", cache_policy=NO_CACHE)
def label_features(
    ctx: StageContext, dictionary: DictionaryRef, cache: ActivationCacheRef, spec: LabelSpec
) -> LabelingRef:
    ident = labeling_identity(ref_identity(dictionary), ref_identity(cache), spec)

    def build(folder: Path, run: StageRun) -> tuple[dict, dict]:
        with StageProgress(f"label {dictionary.id}", PHASES, ctx.progress, stage_logger()) as progress:
            return label(folder, run, progress)

    def label(folder: Path, run: StageRun, progress: StageProgress) -> tuple[dict, dict]:
        progress.step("loading")
        store = ActivationCache(cache.path)
        # the token table and contexts are read in chunks on demand: memory does not grow with the corpus
        corpus = CacheRows(store, spec.max_tokens)
        vocab = corpus.token_names()  # bounded by the vocabulary
        unembedding, decode = None, lambda i: f"<{i}>"
        if spec.logit_effects:
            m = cache.model
            loaded = load_model_ref(m.source, m.spec, m.path, m.converted)
            unembedding = Unembedding.from_model(loaded.model)
            # tokens the cache never saw (promoted/suppressed ones) are decoded by the model's tokenizer
            decode = lambda i, tok=loaded.tokenizer: tok.decode([i])  # noqa: E731
            del loaded
        # on the model's device: the one encode pass is a [batch, d_in] x [d_in, d_sae] matmul per batch, and
        # every statistic over the firing codes runs there too
        sae = load_dictionary(dictionary.path, device=str(resolve_device(cache.model.spec.device)))
        llm = build_labeler(spec.llm, online=ctx.settings.online) if spec.llm is not None else None
        reader = ShardRows(store, dictionary.hookpoint)
        progress.step("feature statistics and labels")
        table = feature_table(
            sae,
            lambda: (reader(rows) for rows in corpus.cache_rows(BATCH_ROWS)),
            corpus,
            lambda ids: [vocab[i] if i in vocab else decode(i) for i in ids],
            unembedding=unembedding,
            embedder=load_minilm() if spec.embedding_score else None,
            llm=llm,
            top_k=spec.top_k,
            window=spec.window,
        )
        table = table.with_columns(pl.lit(dictionary.id).alias("dictionary_id"))
        progress.step("writing the table and atlas")
        write_feature_table(table, folder / "features.parquet")
        if spec.atlas:
            write_atlas(table, folder / "atlas", dictionary.id)
            run.log_artifact(folder / "atlas")
        n_labeled = int(table["label"].is_not_null().sum())
        scores = table["detection_score"].drop_nulls()
        run.log_metrics(
            {
                "n_features": table.height,
                "n_labeled": n_labeled,
                "n_stat_labeled": int(table["stat_label"].is_not_null().sum()),
                "mean_frequency": float(table["frequency"].mean()),
                "mean_detection_score": float(scores.mean()) if len(scores) else float("nan"),
            }
        )
        if llm is not None:
            entries = table.select(pl.col("labels").explode().struct.unnest()).filter(
                pl.col("label_source") == llm.source
            )
            llm_scores = entries["detection_score"].drop_nulls()
            run.log_metrics(
                {
                    **llm.usage(),
                    "n_llm_labeled": entries.height,
                    "mean_llm_detection_score": float(llm_scores.mean()) if len(llm_scores) else float("nan"),
                }
            )
        run.log_artifact(folder / "features.parquet")
        fields = {
            "dictionary_id": dictionary.id,
            "spec": spec,
            "n_features": table.height,
            "n_labeled": n_labeled,
        }
        return fields, {"dictionary_id": dictionary.id, "n_features": table.height}

    name = f"label_features[{dictionary.id}]"
    return run_stage(
        ctx,
        ident,
        LabelingRef,
        name=name,
        config=spec.model_dump(mode="json"),
        parents=[dictionary, cache],
        build=build,
    )
