"""Configs of the dictionaries that are not plain gradient-trained SAEs: bias adaptation (BA, GBA), whose
biases move by a rule; matching pursuit (MP), which codes by greedy selection; semi-NMF, which factorises.

Re-exported by `schemas.methods`, which joins them with the others in `DictionaryConfig`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from featureatlas.schemas.methods_base import TrainingConfig


class _BiasAdaptationFields(TrainingConfig):
    """Fields shared by BA and GBA (Chen et al. 2025, "Taming Polysemanticity"): biases move by rule."""

    # Adam moves only the unit-norm tied rows W (and the scales a) on unit-scale inputs, so the other methods'
    # lr 4e-4 barely turns W: on the bias-adaptation toy (benchmarks/bench_recovery.py, 4000 steps) BA
    # recovers 0.000 of the features at 4e-4, 0.430 at 3e-3, 0.797 at 1e-2 and 0.977 at 3e-2 with this decay.
    lr: float = Field(
        3e-2, gt=0, description="Peak Adam learning rate for W and a (reached after `warmup_steps`)."
    )
    decay_fraction: float = Field(
        0.3, ge=0, le=1, description="Final fraction of the steps over which the lr decays linearly to 0."
    )

    update_every: int = Field(
        50,
        ge=1,
        description="T: steps between bias updates; firing frequencies are counted over these steps.",
    )
    gamma_minus: float = Field(
        0.01,
        gt=0,
        description="Bias decrease per update, times the latent's max pre-activation, if it fires too often.",
    )
    gamma_plus: float = Field(
        0.01,
        gt=0,
        description="Bias increase per update, times its group's mean max pre-activation, if it never fires.",
    )
    dead_eps: float = Field(
        1e-6,
        ge=0,
        description="A latent firing on a smaller share of the recent tokens than this counts as dead.",
    )


class GBAConfig(_BiasAdaptationFields):
    """Group Bias Adaptation: a tied ReLU SAE whose latent groups aim at geometric target frequencies."""

    method: Literal["gba"] = "gba"
    n_groups: int = Field(
        10, ge=1, description="K: number of latent groups, each with its own target frequency."
    )
    freq_high: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Target firing frequency of the first (densest) group. None: 0.8 / sqrt(d_in), above the "
        "rates of features a linear read-out separates from a superposition (see tasks.dictionary.gba).",
    )
    freq_low: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Target firing frequency of the last (sparsest) group. None: freq_high / 2.",
    )

    @model_validator(mode="after")
    def _groups_fit(self) -> GBAConfig:
        if self.n_groups > self.d_sae:
            raise ValueError(f"n_groups={self.n_groups} exceeds d_sae={self.d_sae}; choose n_groups <= d_sae")
        if self.freq_low is not None and self.freq_high is not None and self.freq_low > self.freq_high:
            raise ValueError(f"freq_low={self.freq_low} is above freq_high={self.freq_high}; swap them")
        return self


class BAConfig(_BiasAdaptationFields):
    """Bias Adaptation: GBA with a single group, every latent aiming at one target firing frequency."""

    method: Literal["ba"] = "ba"
    target_freq: float = Field(
        0.01, gt=0, le=1, description="Target share of tokens each latent fires on (the features' true rate)."
    )


class MPConfig(TrainingConfig):
    """Matching-pursuit SAE: greedy selection of unit-norm atoms on the residual, k steps per token."""

    method: Literal["mp"] = "mp"
    k: int = Field(16, ge=1, description="Greedy steps (selected atoms, with repeats) per token in training.")
    residual_threshold: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Stop a token early once ||residual|| <= this times ||x - b_dec|| (0: always k steps).",
    )

    @model_validator(mode="after")
    def _k_below_d_sae(self) -> MPConfig:
        if self.k > self.d_sae:
            raise ValueError(f"k={self.k} exceeds d_sae={self.d_sae}; choose k <= d_sae")
        return self


class SemiNMFConfig(TrainingConfig):
    """Semi-NMF A ~ F G^T: signed features F (sparse combinations of neurons), token weights G >= 0.

    Not gradient-trained: `lr`, `epochs` and `steps` are unused; `batch_size` is the token chunk of each pass.
    """

    method: Literal["snmf"] = "snmf"
    sparsity: float = Field(
        0.01, gt=0, le=1, description="Share of each column of F kept (largest magnitudes) after its update."
    )
    init: Literal["random", "svd", "kmeans"] = Field(
        "svd",
        description="Start from random G, from the activations' top singular directions, or from k-means "
        "clusters of the tokens (G = cluster indicators + 0.2, as Ding, Li & Jordan).",
    )
    init_passes: int = Field(
        100,
        ge=0,
        description="Unsparsified semi-NMF passes after `init`, before F is first sparsified (part of the "
        "initialisation: sparsifying before G separates the features locks columns onto mixed supports).",
    )
    max_iters: int = Field(
        200, ge=1, description="Most alternating F/G updates (each one pass over the tokens)."
    )
    patience: int = Field(
        10, ge=1, description="Stop after this many passes without a relative loss improvement above `tol`."
    )
    tol: float = Field(1e-4, ge=0, description="Relative loss improvement that counts as progress.")
    encode_iters: int = Field(
        100, ge=1, description="Multiplicative NNLS iterations per token in `encode` (codes against F)."
    )
