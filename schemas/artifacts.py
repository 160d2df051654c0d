"""The artifact references that pass between stages.

A reference is small and serialisable: it names an artifact by id and fingerprint, says where its files live
(`path`), which MLflow run made it, and carries the facts downstream stages need without opening the files.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from featureatlas.schemas.base import Contract
from featureatlas.schemas.evaluation import EvalDetails
from featureatlas.schemas.methods import DictionaryConfig
from featureatlas.schemas.spec import (
    CacheSpec,
    CorpusSpec,
    EvaluateSpec,
    InteractionsSpec,
    LabelSpec,
    ModelSpec,
)

ArtifactKind = Literal[
    "model", "corpus", "activation_cache", "dictionary", "evaluation", "labeling", "interactions"
]


class ArtifactRef(Contract):
    id: str = Field(description="Catalog id: '<kind prefix>-<first 12 hex digits of the fingerprint>'.")
    fingerprint: str = Field(description="sha256 of (stage, stage code version, config, input fingerprints).")
    path: str = Field(description="Local folder holding the artifact's files.")
    mlflow_run_id: str | None = Field(None, description="The MLflow run that produced the artifact.")
    reused: bool = Field(False, description="True when this run found the artifact complete in the catalog.")


class ModelRef(ArtifactRef):
    kind: Literal["model"] = "model"
    spec: ModelSpec
    source: str = Field(description="The folder or hub id the model was read from.")
    converted: bool = Field(
        False, description="True when `path` holds a dequantised safetensors copy (made from a GGUF file)."
    )
    architecture: str = Field(description="transformers architecture class, e.g. LlamaForCausalLM.")
    n_layers: int
    d_model: int
    vocab_size: int


class CorpusRef(ArtifactRef):
    kind: Literal["corpus"] = "corpus"
    spec: CorpusSpec
    n_documents: int
    n_chars: int


class ActivationCacheRef(ArtifactRef):
    kind: Literal["activation_cache"] = "activation_cache"
    model: ModelRef
    corpus: CorpusRef
    spec: CacheSpec
    hookpoints: list[str]
    d_in: dict[str, int] = Field(description="Width of each hookpoint's activations.")
    n_tokens: int
    n_contexts: int
    context_length: int


class DictionaryRef(ArtifactRef):
    kind: Literal["dictionary"] = "dictionary"
    cache_id: str
    hookpoint: str
    config: DictionaryConfig
    d_in: int
    d_sae: int
    final_metrics: dict[str, float] = Field(default_factory=dict, description="Last logged training figures.")


class EvalReport(ArtifactRef):
    kind: Literal["evaluation"] = "evaluation"
    dictionary_id: str
    spec: EvaluateSpec
    n_tokens: int = Field(description="Held-out tokens the reconstruction metrics were computed on.")
    fvu: float = Field(
        description="Fraction of variance unexplained: sum ||x - x_hat||^2 / sum ||x - mean||^2."
    )
    explained_variance: float = Field(description="1 - fvu.")
    mse: float = Field(description="Mean over tokens of ||x - x_hat||^2 / d_in.")
    l0: float = Field(description="Mean number of active latents per token.")
    dead_fraction: float = Field(description="Share of latents that never fired on the evaluation tokens.")
    ce_loss_clean: float
    ce_loss_spliced: float
    ce_loss_zero: float
    ce_loss_score: float = Field(description="(L_zero - L_spliced) / (L_zero - L_clean).")
    details: EvalDetails | None = Field(
        None, description="Direction, sparsity, mean-ablation, ablation and steering figures (newer reports)."
    )


class LabelingRef(ArtifactRef):
    kind: Literal["labeling"] = "labeling"
    dictionary_id: str
    spec: LabelSpec
    n_features: int
    n_labeled: int = Field(description="Latents that fired at least once and so received a label.")


class InteractionScoresRef(ArtifactRef):
    """`scores.parquet` (per pair: reference FIS, range over the Rashomon set), `halo.png` and `swarm.png`
    (scaling class), `swarm_retrain.png` (retraining class)."""

    kind: Literal["interactions"] = "interactions"
    spec: InteractionsSpec
    source: str = Field(
        description="The table the reference model was fitted on, or '<dictionary id>:<label>' for a probe."
    )
    n_features: int
    n_pairs: int
    ref_loss: float = Field(description="L*: the reference model's held-out loss.")
    epsilon: float = Field(description="rate * L*.")
    top_pair: list[str] = Field(
        description="The first pair of `scores.parquet`: among those that interact, the most variable."
    )
    ambiguity: float | None = Field(None, description="Classifiers: share of points some model relabels.")
    discrepancy: float | None = Field(None, description="Classifiers: most points one model relabels.")
    features: list[str] = Field(
        default_factory=list, description="The table's feature columns (`latent_<i>` for a dictionary probe)."
    )
    n_retrained: int | None = Field(
        None, description="Retraining class: refit models kept inside the loss bound."
    )
    retrain_note: str | None = Field(
        None, description="Retraining class: why it is empty (no refit within the bound), else None."
    )
    n_interacting: int | None = Field(
        None, description="Scored pairs whose reference FIS lies outside their additive null band."
    )
    dictionary_id: str | None = Field(None, description="source 'dictionary': the dictionary probed.")
    cache_id: str | None = Field(None, description="source 'dictionary': the cache its latents were read on.")


class StageFailure(Contract):
    """One stage of one sweep member that failed; the rest of the sweep went on without it."""

    stage: str = Field(description="The stage, e.g. 'evaluate_dictionary'.")
    member: str = Field(description="Which member: method, d_sae, k and hookpoint, or the dictionary's id.")
    error: str = Field(description="The error's one-line message.")


class DictionaryResult(Contract):
    dictionary: DictionaryRef
    evaluation: EvalReport | None = None
    labeling: LabelingRef | None = None


class PipelineResult(Contract):
    """What one pipeline run produced (or reused), with the MLflow run that tracks it."""

    mlflow_run_id: str
    model: ModelRef | None = Field(None, description="None for a spec that only scores interactions.")
    corpus: CorpusRef | None = None
    cache: ActivationCacheRef | None = None
    dictionaries: list[DictionaryResult] = Field(default_factory=list)
    interactions: InteractionScoresRef | None = None
    failures: list[StageFailure] = Field(
        default_factory=list,
        description="Sweep members' stages that failed while the others went on (empty: everything ran).",
    )
