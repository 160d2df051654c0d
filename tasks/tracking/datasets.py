"""Artifacts as MLflow datasets: a schema, a profile, and a source that names the run that produced them.

The dataset drawer of MLflow's UI shows the schema as a table of (name, type) columns, tensors with their
shapes ("float32 [n_tokens, 64]"), and the profile's sizes. The source is of type "http" (the type whose `url`
the UI renders as a link and an "Open dataset" button) with the UI's own route of the producing run
(`#/runs/<id>`), so one click leads from a consumer run to the run that made its input; the folder is kept
beside it as `uri`. An artifact without a producing run falls back to a local source.
"""

from __future__ import annotations

import json

from mlflow.entities import Dataset as DatasetEntity

from featureatlas.schemas.artifacts import ActivationCacheRef, ArtifactRef, CorpusRef, DictionaryRef, ModelRef

__all__ = ["dataset_entity"]


def _col(name: str, type_: str) -> dict[str, str]:
    return {"name": name, "type": type_}


def _schema(ref: ArtifactRef) -> list[dict[str, str]] | None:
    """The artifact's columns as (name, type) pairs; tensor types carry their shapes ("float32 [n, 64]")."""
    match ref:
        case ActivationCacheRef():
            dtype = ref.spec.dtype
            cols = [_col(c, "long") for c in ("row", "context", "position", "token_id")]
            cols += [_col("token", "string"), _col("is_special", "boolean")]
            cols += [_col("doc_id", "string"), _col("split", "string")]
            return cols + [_col(f"acts/{h}", f"{dtype} [n_tokens, {ref.d_in[h]}]") for h in ref.hookpoints]
        case DictionaryRef():
            return [
                _col("acts", f"float32 [n_tokens, {ref.d_in}]"),
                _col("codes", f"float32 [n_tokens, {ref.d_sae}]"),
            ]
        case CorpusRef():
            return [_col(c, "string") for c in ("doc_id", "source", "text", "split")]
        case ModelRef():
            return [
                _col("input_ids", "long [batch, seq]"),
                _col("hidden_states", f"{ref.spec.dtype} [batch, seq, {ref.d_model}] x {ref.n_layers}"),
                _col("logits", f"{ref.spec.dtype} [batch, seq, {ref.vocab_size}]"),
            ]
        case _:
            return None


def _profile(ref: ArtifactRef) -> dict:
    match ref:
        case ActivationCacheRef():
            return {
                "n_tokens": ref.n_tokens,
                "n_contexts": ref.n_contexts,
                "context_length": ref.context_length,
                "hookpoints": ref.hookpoints,
                "model": ref.model.id,
                "corpus": ref.corpus.id,
            }
        case DictionaryRef():
            cfg = ref.config
            return {"method": cfg.method, "hookpoint": ref.hookpoint, "d_in": ref.d_in, "d_sae": ref.d_sae}
        case CorpusRef():
            return {"n_documents": ref.n_documents, "n_chars": ref.n_chars}
        case ModelRef():
            return {"architecture": ref.architecture, "source": ref.source, "n_layers": ref.n_layers}
        case _:
            return {}


def dataset_entity(ref: ArtifactRef) -> DatasetEntity:
    """`ref` as an MLflow dataset: digest = fingerprint, source = the producing run (or the folder)."""
    if ref.mlflow_run_id:
        # "http" is the source type whose url the UI renders as a link; a route of the UI itself opens the run
        source_type = "http"
        source = {
            "url": f"#/runs/{ref.mlflow_run_id}",
            "run_id": ref.mlflow_run_id,
            "artifact_id": ref.id,
            "uri": ref.path,
        }
    else:
        source_type, source = "local", {"uri": ref.path, "artifact_id": ref.id}
    schema = _schema(ref)
    profile = {"kind": ref.kind, **_profile(ref)}
    return DatasetEntity(
        name=ref.id,
        digest=ref.fingerprint[:32],
        source_type=source_type,
        source=json.dumps(source),
        schema=json.dumps({"mlflow_colspec": schema}) if schema is not None else None,
        profile=json.dumps(profile),
    )
