"""One config per dictionary-learning method, joined in a union keyed by `method`.

Adding a method: write its config here (with `method: Literal["name"]`), add it to `DictionaryConfig`, and
register its module under the same name in `tasks.dictionary.registry`.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field, model_validator

from schemas.base import Contract


class TrainingConfig(Contract):
    """Fields every trained dictionary shares."""

    hookpoint: str | None = Field(None, description="Hookpoint to train on; default: every cached hookpoint.")
    d_sae: int = Field(2048, ge=1, description="Number of latents.")
    lr: float = Field(4e-4, gt=0, description="Adam learning rate.")
    batch_size: int = Field(1024, ge=1, description="Token rows per optimizer step.")
    epochs: int = Field(1, ge=1, description="Passes over the training tokens (ignored if `steps` is set).")
    steps: int | None = Field(
        None, ge=1, description="Optimizer steps; default: `epochs` passes over the data."
    )
    seed: int = Field(0, description="Seed for initialisation and the data order.")
    device: str = Field("auto", description="'auto' (CUDA when present, else CPU), 'cpu' or 'cuda[:N]'.")
    log_every: int = Field(20, ge=1, description="Log loss, FVU and L0 to MLflow every this many steps.")


class TopKConfig(TrainingConfig):
    """TopK SAE (Gao et al. 2024): keep the k largest pre-activations per token."""

    method: Literal["topk"] = "topk"
    k: int = Field(32, ge=1, description="Active latents per token.")
    auxk_coef: float = Field(
        1 / 32, ge=0, description="Weight of the AuxK loss that revives dead latents (0 turns it off)."
    )
    dead_tokens: int = Field(
        200_000, ge=1, description="A latent that has not fired for this many tokens counts as dead for AuxK."
    )

    @model_validator(mode="after")
    def _k_below_d_sae(self) -> TopKConfig:
        if self.k > self.d_sae:
            raise ValueError(f"k={self.k} exceeds d_sae={self.d_sae}; choose k <= d_sae")
        return self


# ---- issue 4b: bias adaptation, matching pursuit, semi-NMF ----------------------------------------------


class _BiasAdaptationFields(TrainingConfig):
    """Fields shared by BA and GBA (Chen et al. 2025, "Taming Polysemanticity"): biases move by rule."""

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
    freq_high: float = Field(
        0.5, gt=0, le=1, description="Target firing frequency of the first (densest) group."
    )
    freq_low: float = Field(
        1e-3, gt=0, le=1, description="Target firing frequency of the last (sparsest) group."
    )

    @model_validator(mode="after")
    def _groups_fit(self) -> GBAConfig:
        if self.n_groups > self.d_sae:
            raise ValueError(f"n_groups={self.n_groups} exceeds d_sae={self.d_sae}; choose n_groups <= d_sae")
        if self.freq_low > self.freq_high:
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
    init: Literal["random", "svd"] = Field(
        "svd", description="Start from random G, or from the activations' top singular directions."
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


DictionaryConfig = Annotated[
    Union[TopKConfig, GBAConfig, BAConfig, MPConfig, SemiNMFConfig],  # noqa: UP007
    Field(discriminator="method"),
]
