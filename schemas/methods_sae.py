"""Configs of the linear-encoder SAEs outside the TopK family: ReLU (L1), JumpReLU, gated and threshold.

Re-exported by `schemas.methods`, which joins them with the others in `DictionaryConfig`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from featureatlas.schemas.methods_base import TrainingConfig


class ReLUConfig(TrainingConfig):
    """ReLU SAE with an L1 penalty; `scaled_l1` is Anthropic's April-2024 variant (penalty weighted by decoder
    row norms, decoder unconstrained)."""

    method: Literal["relu"] = "relu"
    # 2.0: on SmolLM2-135M layer 6 (inputs scaled to mean squared norm d_in; 1024 latents, 300 steps), L1
    # weights 1 / 2 / 5 gave held-out L0 181 / 94 / 30 at FVU 0.23 / 0.36 / 0.64 (see the README).
    l1_coef: float = Field(2.0, ge=0, description="L1 penalty weight, relative to the summed squared error.")
    scaled_l1: bool = Field(
        False,
        description="Weight each latent's |code| by its decoder row norm and leave the decoder unconstrained "
        "(False: plain L1 with unit-norm decoder rows).",
    )
    l1_warmup_steps: int = Field(0, ge=0, description="Steps over which the L1 weight ramps linearly from 0.")


class JumpReLUConfig(TrainingConfig):
    """JumpReLU SAE (Rajamanoharan et al. 2024): per-latent learnable thresholds, straight-through grads."""

    method: Literal["jumprelu"] = "jumprelu"
    # 1e-3, not the shared 4e-4: at 4e-4 the encoder turns onto planted features too slowly for a few
    # thousand steps (32 features in 16 dimensions, 3000 steps: 0.84 at cosine 0.8 against 1.0; see
    # tasks.dictionary.jumprelu).
    lr: float = Field(1e-3, gt=0, description="Peak AdamW learning rate (reached after `warmup_steps`).")
    sparsity: Literal["step", "tanh"] = Field(
        "step", description="L0 penalty: the step function (with STE) or Anthropic's tanh(c |z| ||d||)."
    )
    l0_coef: float = Field(1.0, ge=0, description="Sparsity penalty weight, relative to squared error.")
    # Scaled units: input scaling gives the initial pre-activations a standard deviation near 1, so these are
    # in units of that spread. Chosen on planted families (see tasks.dictionary.jumprelu), against SAELens.
    bandwidth: float = Field(2.0, gt=0, description="Width of the STE's rectangle kernel (scaled units).")
    init_threshold: float = Field(1.5, gt=0, description="Initial threshold of every latent (scaled units).")
    tanh_c: float = Field(4.0, gt=0, description="Steepness c of the tanh penalty (sparsity='tanh').")
    l0_warmup_steps: int = Field(
        0, ge=0, description="Steps over which the sparsity weight ramps linearly from 0 to `l0_coef`."
    )

    @model_validator(mode="after")
    def _bandwidth_below_threshold(self) -> JumpReLUConfig:
        if self.bandwidth > 2 * self.init_threshold:
            raise ValueError(
                f"bandwidth={self.bandwidth} is wider than 2 x init_threshold={self.init_threshold}: the STE "
                "window would reach negative pre-activations; lower bandwidth or raise init_threshold"
            )
        return self


class GatedConfig(TrainingConfig):
    """Gated SAE (Rajamanoharan et al. 2024): a gate path picks latents, a magnitude path sizes them."""

    method: Literal["gated"] = "gated"
    l1_coef: float = Field(5.0, ge=0, description="Weight of the L1 penalty on the gate pre-activations.")


class ThresholdConfig(TrainingConfig):
    """Threshold-activated SAE ("Towards Atoms of LLMs"): z = (W_enc x) * 1[W_enc x >= tau]."""

    method: Literal["threshold"] = "threshold"
    tau: float | None = Field(
        None,
        gt=0,
        description="Global activation threshold (scaled units), fixed during training. None: fitted at "
        "initialisation as `tau_sigmas` robust standard deviations of the initial pre-activations.",
    )
    tau_sigmas: float = Field(
        2.0,
        gt=0,
        description="With tau None: tau in robust standard deviations of the initial pre-activations.",
    )
    use_bias: bool = Field(False, description="Learn b_enc and b_dec (False: the paper's bias-free form).")
