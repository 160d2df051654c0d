"""One config per dictionary-learning method, joined in a union keyed by `method`.

Adding a method: write its config here (with `method: Literal["name"]`), add it to `DictionaryConfig`, and
register its module under the same name in `tasks.dictionary.registry`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

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


# The TopK family's learning rate at 2^14 latents; it falls as 1/sqrt(d_sae) (Gao et al. 2024, fig. 3).
TOPK_LR_AT_16K = 2e-4


def topk_lr(d_sae: int) -> float:
    """The TopK family's default peak lr: 2e-4 x sqrt(16384 / d_sae) (3.8e-4 at 4608 latents)."""
    return TOPK_LR_AT_16K * (2**14 / d_sae) ** 0.5


class TopKConfig(TrainingConfig):
    """TopK SAE (Gao et al. 2024): keep the k largest pre-activations per token.

    The defaults (BatchTopK and Matryoshka share them) were chosen on SmolLM2-135M layer-6 activations
    (benchmarks/bench_peers.py, d_sae 4608, k 32, batch 1024, 280 steps, full held-out FVU): unit-norm
    gradients are what mattered (0.1104 with them, 0.1282 without); with them Gao et al.'s and
    dictionary_learning's schedule (lr 2e-4 x sqrt(16384 / d_sae), 5% warm-up, linear decay over the last
    20%, geometric-median b_dec) reached dictionary_learning's TopKTrainer (0.1104 both), a constant lr 4e-4
    without warm-up 0.1113.
    """

    method: Literal["topk"] = "topk"
    # Never None once validated: `_lr_from_d_sae` writes the number in, so dumps and fingerprints carry it.
    lr: float | None = Field(
        None,
        gt=0,
        description="Peak AdamW learning rate (reached after the warm-up); null (the default): 2e-4 x "
        "sqrt(16384 / d_sae), the 1/sqrt(latents) law of Gao et al. 2024 (3.8e-4 at 4608 latents).",
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


# ---- bias adaptation, matching pursuit, semi-NMF ----------------------------------------------


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
        description="Target firing frequency of the first (densest) group. None: 1 / sqrt(d_in), above the "
        "rates of features a linear read-out separates from a superposition (see tasks.dictionary.gba).",
    )
    freq_low: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Target firing frequency of the last (sparsest) group. None: freq_high / 5.",
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


# ---- relu, batchtopk, matryoshka, jumprelu, gated, threshold ----------------------------


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


class JumpReLUConfig(TrainingConfig):
    """JumpReLU SAE (Rajamanoharan et al. 2024): per-latent learnable thresholds, straight-through grads."""

    method: Literal["jumprelu"] = "jumprelu"
    sparsity: Literal["step", "tanh"] = Field(
        "step", description="L0 penalty: the step function (with STE) or Anthropic's tanh(c |z| ||d||)."
    )
    l0_coef: float = Field(1.0, ge=0, description="Sparsity penalty weight, relative to squared error.")
    # Scaled units: input scaling gives the initial pre-activations a standard deviation near 1, so these are
    # in units of that spread. Chosen on planted families (see tasks.dictionary.jumprelu), against SAELens.
    bandwidth: float = Field(2.0, gt=0, description="Width of the STE's rectangle kernel (scaled units).")
    init_threshold: float = Field(1.5, gt=0, description="Initial threshold of every latent (scaled units).")
    tanh_c: float = Field(4.0, gt=0, description="Steepness c of the tanh penalty (sparsity='tanh').")

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
