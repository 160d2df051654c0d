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


DictionaryConfig = Annotated[Union[TopKConfig], Field(discriminator="method")]  # noqa: UP007
