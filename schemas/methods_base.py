"""What every trained dictionary's config shares: `TrainingConfig`, and which methods can train how.

The method configs build on it in `schemas.methods` (the TopK family and the union of all methods),
`schemas.methods_sae` (the other linear-encoder SAEs) and `schemas.methods_other` (bias adaptation, matching
pursuit, semi-NMF).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from featureatlas.schemas.base import Contract

# Methods whose code can encode one hookpoint and reconstruct another (tasks.dictionary.transcoder): the
# linear-encoder SAEs. Not GBA/BA (tied weights), MP (pursuit on its own residual) or semi-NMF (factorises).
TRANSCODER_METHODS = ("topk", "batchtopk", "matryoshka", "relu", "jumprelu", "gated", "threshold")
# Methods that can train data-parallel (tasks.dictionary.distributed): every gradient-trained one whose state
# lives in its parameters. Not GBA/BA (bias updates outside the gradient) or semi-NMF (its own fit): their
# state would be per-rank.
DATA_PARALLEL_METHODS = (*TRANSCODER_METHODS, "mp")


class TrainingConfig(Contract):
    """Fields every trained dictionary shares."""

    hookpoint: str | None = Field(None, description="Hookpoint to train on; default: every cached hookpoint.")
    target_hookpoint: str | None = Field(
        None,
        # Left out of dumps (so of fingerprints and cfg.json) when unset: plain dictionaries are unchanged.
        exclude_if=lambda v: v is None,
        description="Train a transcoder: encode `hookpoint`'s activations, reconstruct this hookpoint's "
        "(e.g. hookpoint 'model.layers.3.post_attention_layernorm', target 'mlp_out.3'). Both must be cached "
        "and of the same width. Not for gba, ba, mp or snmf.",
    )
    d_sae: int = Field(2048, ge=1, description="Number of latents.")
    lr: float = Field(4e-4, gt=0, description="Peak AdamW learning rate (reached after `warmup_steps`).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay (0: plain Adam).")
    warmup_steps: int = Field(0, ge=0, description="Steps of linear learning-rate warm-up from 0 to `lr`.")
    decay_fraction: float = Field(
        0.0, ge=0, le=1, description="Final fraction of the steps over which the lr decays linearly to 0."
    )
    b_dec_init: Literal["mean", "geometric_median", "zeros"] = Field(
        "mean",
        description="Initial decoder bias: the data mean, its geometric median (outlier-robust) or zeros.",
    )
    batch_size: int = Field(1024, ge=1, description="Token rows per optimizer step.")
    epochs: int = Field(1, ge=1, description="Passes over the training tokens (ignored if `steps` is set).")
    steps: int | None = Field(
        None, ge=1, description="Optimizer steps; default: `epochs` passes over the data."
    )
    seed: int = Field(0, description="Seed for initialisation and the data order.")
    device: str = Field("auto", description="'auto' (CUDA when present, else CPU), 'cpu' or 'cuda[:N]'.")
    log_every: int = Field(20, ge=1, description="Log loss, FVU and L0 to MLflow every this many steps.")
    # the trainer loop: checkpoints and CUDA speed-ups
    checkpoint_every: int = Field(
        1000,
        ge=1,
        description="Steps between checkpoints (weights + optimizer state) that a killed run resumes from; "
        "written when the trainer is given a checkpoint folder (the pipeline always gives one).",
    )
    autocast: Literal["none", "bf16"] = Field(
        "none",
        description="Mixed precision of the forward pass: 'bf16' runs it under bfloat16 autocast (weights "
        "and optimizer stay float32). Meant for CUDA; it also works on CPU, more slowly.",
    )
    compile: bool = Field(
        False, description="Compile the training loss with torch.compile (worth it on CUDA, for long runs)."
    )
    tf32: bool = Field(
        True,
        # Left out of dumps at its default (so of fingerprints and cfg.json): it changes speed, not method.
        exclude_if=lambda v: v is True,
        description="On CUDA, run float32 matmuls in TF32 (~8x faster on Ampere and later, ~1e-3 relative "
        "error); false keeps full float32. No effect on CPU or under autocast: bf16.",
    )
    # data-parallel training from the spec
    nproc_per_node: int = Field(
        1,
        ge=1,
        # Left out of dumps at 1 (so of fingerprints and cfg.json): single-process dictionaries are unchanged.
        exclude_if=lambda v: v == 1,
        description="Train data-parallel in this many processes (torchrun, DistributedDataParallel; one per "
        "GPU, NCCL on GPUs, gloo on CPU), each on batch_size / nproc_per_node rows of every batch. Above 1 "
        "the dictionary trains alone (not in a sweep's shared pass), without checkpoints, and differs from "
        "the 1-process result (losses are normalised per process's share), so it is a different dictionary.",
    )

    @model_validator(mode="after")
    def _transcoder_fields(self) -> TrainingConfig:
        if self.target_hookpoint is None:
            return self
        method = getattr(self, "method", None)
        if method not in TRANSCODER_METHODS:
            raise ValueError(
                f"method {method!r} cannot be trained as a transcoder (target_hookpoint is set); use one of "
                f"{', '.join(TRANSCODER_METHODS)}, or drop target_hookpoint"
            )
        if self.hookpoint is None:
            raise ValueError(
                f"a transcoder (target_hookpoint {self.target_hookpoint!r}) needs `hookpoint`, its input "
                "site; set it, e.g. hookpoint: model.layers.3.post_attention_layernorm"
            )
        if self.hookpoint == self.target_hookpoint:
            raise ValueError(
                f"target_hookpoint equals hookpoint ({self.hookpoint!r}); drop target_hookpoint for a plain "
                "dictionary, or name the site the transcoder should predict"
            )
        return self

    @model_validator(mode="after")
    def _data_parallel_fields(self) -> TrainingConfig:
        n = self.nproc_per_node
        if n == 1:
            return self
        method = getattr(self, "method", None)
        if method not in DATA_PARALLEL_METHODS:
            raise ValueError(
                f"method {method!r} cannot train data-parallel (nproc_per_node={n}): its updates outside the "
                f"gradient would differ per process; drop nproc_per_node, or use one of "
                f"{', '.join(DATA_PARALLEL_METHODS)}"
            )
        unsupported = [
            name
            for name, on in (
                ("target_hookpoint", self.target_hookpoint is not None),
                ("autocast", self.autocast != "none"),
                ("compile", self.compile),
            )
            if on
        ]
        if unsupported:
            raise ValueError(
                f"nproc_per_node={n} does not support {', '.join(unsupported)} yet; drop it, or train in "
                "one process (nproc_per_node: 1)"
            )
        if self.batch_size % n:
            raise ValueError(
                f"batch_size {self.batch_size} does not split over nproc_per_node={n} processes; use a "
                f"multiple of {n}, e.g. {self.batch_size - self.batch_size % n or n}"
            )
        return self
