"""One config per dictionary-learning method, joined in a union keyed by `method`.

This module holds the TopK family (TopK, BatchTopK, Matryoshka) and the union; the shared fields live in
`schemas.methods_base`, the other SAE variants in `schemas.methods_sae`, bias adaptation, matching pursuit
and semi-NMF in `schemas.methods_other`. Every config is importable from here.

Adding a method: write its config (with `method: Literal["name"]`) in the module of its family, add it to
`DictionaryConfig`, and register its module under the same name in `tasks.dictionary.registry`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import Field, model_validator

from featureatlas.schemas.methods_base import DATA_PARALLEL_METHODS, TRANSCODER_METHODS, TrainingConfig
from featureatlas.schemas.methods_other import BAConfig, GBAConfig, MPConfig, SemiNMFConfig
from featureatlas.schemas.methods_sae import GatedConfig, JumpReLUConfig, ReLUConfig, ThresholdConfig

__all__ = [
    "DATA_PARALLEL_METHODS",
    "TOPK_LR_AT_16K",
    "TRANSCODER_METHODS",
    "BAConfig",
    "BatchTopKConfig",
    "DictionaryConfig",
    "GBAConfig",
    "GatedConfig",
    "JumpReLUConfig",
    "MPConfig",
    "MatryoshkaConfig",
    "ReLUConfig",
    "SemiNMFConfig",
    "ThresholdConfig",
    "TopKConfig",
    "TrainingConfig",
    "topk_lr",
]


# The TopK family's learning rate at 2^14 latents; it falls as 1/sqrt(d_sae) (Gao et al. 2024, fig. 3). Twice
# Gao et al.'s and dictionary_learning's 2e-4: with unit-norm gradients it reached a lower held-out FVU at
# every length and batch measured (benchmarks/bench_peers.py; the table in TopKConfig's docstring).
TOPK_LR_AT_16K = 4e-4


def topk_lr(d_sae: int) -> float:
    """The TopK family's default peak lr: 4e-4 x sqrt(16384 / d_sae) (7.5e-4 at 4608 latents)."""
    return TOPK_LR_AT_16K * (2**14 / d_sae) ** 0.5


class TopKConfig(TrainingConfig):
    """TopK SAE (Gao et al. 2024): keep the k largest pre-activations per token.

    The defaults (BatchTopK and Matryoshka share them) were chosen on SmolLM2-135M layer-6 activations
    (benchmarks/bench_peers.py, d_sae 4608, k 32, held-out FVU): Gao et al.'s schedule (5% warm-up, linear
    decay over the last 20%, geometric-median b_dec) with each step's gradient scaled to unit norm, which
    mattered most (0.1104 with it, 0.1282 without, batch 1024), and twice their peak lr. At 5 epochs of
    batch 4096 (270 steps): lr 3.8e-4 0.0913, 5.6e-4 0.0821, 7.5e-4 (the default) 0.0752, against
    dictionary_learning's TopKTrainer 0.0925, all with 0 dead latents; x2 was also best at 2 epochs and at
    batch 1024.
    """

    method: Literal["topk"] = "topk"
    # Never None once validated: `_lr_from_d_sae` writes the number in, so dumps and fingerprints carry it.
    lr: float | None = Field(
        None,
        gt=0,
        description="Peak AdamW learning rate (reached after the warm-up); null (the default): 4e-4 x "
        "sqrt(16384 / d_sae), the 1/sqrt(latents) law of Gao et al. 2024 (7.5e-4 at 4608 latents).",
    )
    warmup_steps: int | None = Field(
        None,
        ge=0,
        description="Steps of linear learning-rate warm-up from 0 to `lr`; null (the default): 5% of the "
        "run's steps, at most 1000.",
    )
    b_dec_init: Literal["mean", "geometric_median", "zeros"] = Field(
        "geometric_median",
        description="Initial decoder bias: the data mean, its geometric median (outlier-robust) or zeros.",
    )
    decay_fraction: float = Field(
        0.2,
        ge=0,
        le=1,
        description="Final fraction of the steps over which the lr decays linearly to 0 (Gao et al. and "
        "dictionary_learning decay over the last 20%).",
    )
    k: int = Field(32, ge=1, description="Active latents per token.")
    auxk_coef: float = Field(
        1 / 32, ge=0, description="Weight of the AuxK loss that revives dead latents (0 turns it off)."
    )
    dead_tokens: int = Field(
        200_000, ge=1, description="A latent that has not fired for this many tokens counts as dead for AuxK."
    )
    unit_grad_norm: bool = Field(
        True,
        description="Scale each step's whole gradient to unit L2 norm before AdamW, so that Adam's "
        "long-memory second moment does not shrink the later steps as the loss falls (see "
        "TopKSAE.before_optimizer_step). On benchmarks/bench_peers.py (batch 1024, 280 steps): held-out "
        "FVU 0.1104 with it, 0.1282 without.",
    )

    @model_validator(mode="before")
    @classmethod
    def _lr_from_d_sae(cls, data: Any) -> Any:
        """`lr` null or absent becomes `topk_lr(d_sae)`, written into the config so that dumps carry it."""
        if isinstance(data, dict) and data.get("lr") is None:
            d_sae = data.get("d_sae", cls.model_fields["d_sae"].default)
            if isinstance(d_sae, int) and d_sae >= 1:  # else the d_sae field reports the error
                data = {**data, "lr": topk_lr(d_sae)}
        return data

    @model_validator(mode="after")
    def _k_below_d_sae(self) -> TopKConfig:
        if self.k > self.d_sae:
            raise ValueError(f"k={self.k} exceeds d_sae={self.d_sae}; choose k <= d_sae")
        return self


class BatchTopKConfig(TopKConfig):
    """BatchTopK SAE (Bussmann et al. 2024): keep the top k*batch pre-activations across the whole batch."""

    method: Literal["batchtopk"] = "batchtopk"  # type: ignore[assignment]
    threshold_beta: float = Field(
        0.999,
        ge=0,
        lt=1,
        description="Largest EMA decay of the inference threshold (smallest kept code per batch); after t "
        "steps the decay is min(threshold_beta, (1 + t) / (50 + t)), so early batches are forgotten.",
    )


class MatryoshkaConfig(BatchTopKConfig):
    """Matryoshka BatchTopK SAE: each nested prefix of the latents must reconstruct the input alone."""

    method: Literal["matryoshka"] = "matryoshka"  # type: ignore[assignment]
    prefixes: tuple[int, ...] | None = Field(
        None,
        description="Increasing prefix sizes ending at d_sae; default: d_sae/8, d_sae/4, d_sae/2, d_sae.",
    )

    @model_validator(mode="after")
    def _prefixes_nested(self) -> MatryoshkaConfig:
        p = self.prefixes
        if p is not None and (
            not p or p[-1] != self.d_sae or any(a >= b for a, b in zip(p, p[1:])) or p[0] < 1
        ):
            raise ValueError(
                f"prefixes={p} must be strictly increasing, >= 1 and end at d_sae={self.d_sae}; "
                f"e.g. ({self.d_sae // 4}, {self.d_sae})"
            )
        return self

    def prefix_sizes(self) -> tuple[int, ...]:
        """The prefixes to use: the configured ones or the default halving ladder."""
        if self.prefixes is not None:
            return self.prefixes
        return tuple(sorted({max(1, self.d_sae // div) for div in (8, 4, 2, 1)}))


DictionaryConfig = Annotated[
    Union[  # noqa: UP007
        TopKConfig,
        # SAE variants
        ReLUConfig,
        BatchTopKConfig,
        MatryoshkaConfig,
        JumpReLUConfig,
        GatedConfig,
        ThresholdConfig,
        # bias adaptation, matching pursuit, semi-NMF
        GBAConfig,
        BAConfig,
        MPConfig,
        SemiNMFConfig,
    ],
    Field(discriminator="method"),
]
