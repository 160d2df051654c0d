"""The inputs of a pipeline spec: the model, the corpus, and how activations are cached.

Part of the pipeline spec (`schemas/spec.py` re-exports every name here). Validators check shapes only;
whether files exist and hookpoints resolve is checked by the plan before any stage runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from featureatlas.schemas.base import Contract

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
    kind: Literal["causal_lm", "encoder"] = Field(
        "causal_lm",
        description="'causal_lm' loads with AutoModelForCausalLM (Llama, Gemma, GPT-2, ...); 'encoder' with "
        "AutoModel (BERT-style, no LM head: caching, training and labeling work, the CE-loss evaluation does "
        "not).",
    )
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
        "'builtin:stdlib_docstrings': docstrings of the standard library), local .txt, .jsonl or "
        ".parquet files (one document per .txt file; per record otherwise), folders of such files (all of "
        "them, in path order) or folders written by `datasets`' save_to_disk (one document per record). "
        "Relative paths are read from the spec file's folder.",
        min_length=1,
    )
    text_field: str = Field("text", description="Field holding the text in .jsonl and .parquet files.")
    context_length: int = Field(128, ge=8, le=8192, description="Tokens per context window.")
    max_tokens: int = Field(
        250_000,
        ge=256,
        description="Token budget: stop once this many tokens are cached (training and held-out documents "
        "each take their share, see `heldout_fraction`).",
    )
    heldout_fraction: float = Field(
        0.1,
        ge=0.0,
        lt=1.0,
        description="Share of documents held out for evaluation (split by document), and the share of "
        "`max_tokens` reserved for them, so a budget smaller than the corpus still holds held-out tokens.",
    )
    min_context_tokens: int = Field(
        16, ge=2, description="Drop the tail of a document shorter than this (unpacked contexts only)."
    )
    pack: bool = Field(
        False,
        description="Pack documents (each followed by EOS) end to end into full contexts of "
        "`context_length` tokens, train and held-out documents separately, until exactly `max_tokens` tokens "
        "(or the whole corpus) are taken. Off: one document per context window, tails dropped.",
    )

    @field_validator("sources")
    @classmethod
    def _sources(cls, v: list[str]) -> list[str]:
        for s in v:
            if s.startswith("builtin:") and s not in BUILTIN_CORPORA:
                raise ValueError(f"unknown built-in corpus {s!r}; available: {', '.join(BUILTIN_CORPORA)}")
            if not s.startswith("builtin:") and Path(s).suffix not in ("", ".txt", ".jsonl", ".parquet"):
                raise ValueError(
                    f"corpus file {s!r} must end in .txt, .jsonl or .parquet, or be a folder written by "
                    "`datasets`' save_to_disk or a folder of such files (a path without a suffix)"
                )
        return v


class CacheSpec(Contract):
    """How activations are stored."""

    dtype: DType | Literal["auto"] = Field(
        "auto",
        description="Dtype of the stored activations; 'auto' follows the model's dtype (a bfloat16 model "
        "stores bfloat16 shards, half the disk of float32). Set 'float32' to keep full precision of a "
        "low-precision model's activations anyway.",
    )
    store: bool = Field(
        True,
        description="Write activation shards. False stores only the token table and contexts: training "
        "streams forward passes straight into the dictionaries (a sweep shares each pass), and evaluation "
        "and labeling recompute the activations they need from the model. For corpora whose activations do "
        "not fit on disk (10^8 tokens x 2304 dims is 460 GB in bfloat16).",
    )
    shard_tokens: int = Field(65_536, ge=64, description="Token rows per shard file.")
    batch_size: int = Field(8, ge=1, description="Contexts per forward pass.")
    exclude_first_token: bool = Field(
        True,
        description="Leave position 0 of every context out of training, evaluation and labeling: it acts "
        "as an attention sink with norms far above the rest and wrecks SAE training. It is still cached.",
    )
    exclude_special_tokens: bool = Field(
        True,
        description="Leave special tokens (BOS, CLS, SEP, EOS: the tokenizer's special ids, flagged "
        "`is_special` in tokens.parquet) out of training, evaluation and labeling; their activations have "
        "huge norms. They are still cached.",
    )
    parts: int = Field(
        1,
        ge=1,
        description="Jobs the forward passes are split into, each caching its own range of shards through "
        "the settings' task runner (a Dask cluster runs them at once; threads run them in turn). The cache "
        "is byte-identical for every value, so it is not part of the cache's fingerprint; more parts than "
        "full shards are cut down to one part per full shard.",
    )
