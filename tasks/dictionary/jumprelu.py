"""JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead"): z_i = pre_i * 1[pre_i > theta_i].

Each latent has its own threshold theta_i, learned through straight-through estimators (STEs): the step
function's derivative in theta is replaced by a rectangle kernel of width `bandwidth`,
    d/dtheta H(pre - theta) ~ -(1/eps) K((pre - theta)/eps),   d/dtheta JumpReLU ~ -(theta/eps) K(...),
with K(u) = 1[|u| < 1/2]. The sparsity penalty is the L0 (step, through the STE) or Anthropic's
tanh(c |z_i| ||W_dec_i||). The threshold is stored directly, not as its log: in log space the gradient is
scaled by theta itself, and a small threshold barely moves (a known failure in other libraries); here it is
clamped to stay positive after each step instead.

Defaults: lr 1e-3, init_threshold 1.5, bandwidth 2.0, l0_coef 1 (step penalty), no warm-up of the
sparsity weight. Inputs are scaled to E||x||^2 = d_in, so the initial encoder's pre-activations (W_enc =
W_dec^T, unit rows) have a standard deviation near 1, and threshold and bandwidth are in units of that spread.
Compared:
  * SAELens (`JumpReLUTrainingSAEConfig`): init threshold 0.001 and bandwidth 0.001 (older releases), 0.01
    and 0.05 (newer ones, with decoder rows initialised at norm 0.1, so initial pre-activations of spread
    ~0.1: threshold 0.1 and bandwidth 0.5 of the spread); L0 coefficient 1 against the per-token summed
    squared error, which is what `l0_coef` 1 is here (both terms are divided by the batch variance); an L0
    warm-up (`l0_warm_up_steps`) that is off by default; lr 3e-4 (the trainer's default); the threshold
    learned as its log.
  * dictionary_learning (`trainers/jumprelu.py`): bandwidth 0.001, threshold 0.001, the penalty
    (L0 / target_l0 - 1)^2 towards a target L0 instead of a coefficient, warmed up over 2000 steps; lr 7e-5
    with 1000 warm-up steps and Adam betas (0, 0.999), for runs of ~10^5 steps on language-model activations.
What the toys show. With the earlier defaults (threshold 0.1, bandwidth 0.05: a tenth and a twentieth of the
spread) every latent started firing on interference and the kernel was so narrow that few pre-activations
informed a threshold's gradient: on a planted toy (32 features in 16 dimensions, 3 per token, 3000 steps of
batch 128) recovery at cosine 0.8 was 0.22 at L0 4.7. Threshold / bandwidth on `bench_fidelity.py`'s mixed
family (3000 steps, lr 4e-4): 0.5 / 0.5 0.34, 1.0 / 1.0 0.66, 1.5 / 1.0 0.78, 2.0 / 1.0 0.79, 1.0 / 2.0 0.76,
1.5 / 2.0 0.82, 1.5 / 3.0 0.78 (dead 15%). What then limited recovery was the lr, not the threshold: the
thresholds end near 1.3-1.5 whatever the run's length, while the largest pre-activations of live latents
reach 2.0 at lr 4e-4 and 3.6 at 1e-3 (the encoder's rows turned onto the features). On the 32-feature toy
lr 4e-4 gave 0.84 at 3000 steps and 0.97 at 6000; lr 1e-3 gives 1.0 / 0.88 / 0.94 at 3000 for dictionary
seeds 0 / 1 / 2 (L0 2.1-2.2 for 3 true), and on the benchmark's families (3000 steps, batch 256) 0.92 on the
small one (0.90 at lr 4e-4) and 0.97 on the mixed one (0.82); 2e-3 gave 0.96 / 0.98. Warming the sparsity
weight up over 1000 steps changed nothing (0.84 at lr 4e-4); l0_coef 0.5 at lr 1e-3 gave 0.97 / 0.92 / 0.98
with a lower FVU (L0 nearer the truth), l0_coef 0.5 or 2 at lr 4e-4 0.81 on the toy. Adam moves a parameter
by about lr per step, so on language-model activations over ~10^5 steps a smaller lr may serve as well.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from featureatlas.schemas.methods import JumpReLUConfig
from featureatlas.tasks.dictionary.base import TrainStepOutput
from featureatlas.tasks.dictionary.registry import register
from featureatlas.tasks.dictionary.sae_common import LinearSAE

# Smallest threshold allowed after an optimizer step: theta <= 0 would let every positive pre-activation fire.
_MIN_THRESHOLD = 1e-6


def _kernel(pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """Rectangle kernel K((pre - theta)/eps) / eps, the STE's stand-in for the Dirac delta."""
    return ((pre - threshold).abs() < bandwidth / 2).to(pre.dtype) / bandwidth


class _JumpReLU(torch.autograd.Function):
    """pre * 1[pre > theta]; grad in pre passes where it fires, grad in theta via the kernel."""

    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pre, threshold = ctx.saved_tensors
        grad_pre = grad * (pre > threshold).to(pre.dtype)
        grad_theta = -(threshold * _kernel(pre, threshold, ctx.bandwidth) * grad)
        return grad_pre, grad_theta.reshape(-1, threshold.shape[-1]).sum(0), None


class _Step(torch.autograd.Function):
    """1[pre > theta]; no grad in pre, grad in theta via the kernel."""

    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pre, threshold = ctx.saved_tensors
        grad_theta = -(_kernel(pre, threshold, ctx.bandwidth) * grad)
        return torch.zeros_like(pre), grad_theta.reshape(-1, threshold.shape[-1]).sum(0), None


@register
class JumpReLUSAE(LinearSAE):
    """Linear encoder, per-latent `threshold` [d_sae], unit-norm decoder rows."""

    method: ClassVar[str] = "jumprelu"
    config_cls: ClassVar[type[JumpReLUConfig]] = JumpReLUConfig
    cfg: JumpReLUConfig

    def __init__(self, cfg: JumpReLUConfig, d_in: int) -> None:
        super().__init__(cfg, d_in)
        self.threshold = nn.Parameter(torch.full((cfg.d_sae,), cfg.init_threshold))

    def activation(self, pre: Tensor) -> Tensor:
        return _JumpReLU.apply(pre, self.threshold, self.cfg.bandwidth)

    def l0_weight(self) -> float:
        """The sparsity weight at the current step: ramps from 0 to `l0_coef` over `l0_warmup_steps`."""
        warmup = self.cfg.l0_warmup_steps
        if warmup == 0:
            return self.cfg.l0_coef
        return self.cfg.l0_coef * min(1.0, (self.steps_taken + 1) / warmup)

    def sparsity_penalty(self, pre: Tensor, codes: Tensor) -> Tensor:
        """Summed over the batch: L0 through the step STE, or sum tanh(c |z_i| ||W_dec_i||)."""
        match self.cfg.sparsity:
            case "step":
                return _Step.apply(pre, self.threshold, self.cfg.bandwidth).sum()
            case "tanh":
                return torch.tanh(self.cfg.tanh_c * codes.abs() * self.W_dec.norm(dim=-1)).sum()
            case other:
                raise ValueError(f"sparsity {other!r} unknown; use 'step' or 'tanh'")

    def training_loss(
        self,
        acts: Tensor,
        dead_mask: Tensor,  # noqa: ARG002
        target: Tensor | None = None,
    ) -> TrainStepOutput:
        x, y = self.sites(acts, target)  # y: what to reconstruct (x itself, or a transcoder's target)
        pre = self.pre_acts(x)
        codes = self.activation(pre)
        err = y - self.decode_scaled(codes)
        err_sq = err.pow(2).sum()
        var = self.batch_variance(y)
        fvu = err_sq / var
        return TrainStepOutput(
            loss=fvu + self.l0_weight() * self.sparsity_penalty(pre, codes) / var,
            mse=(err_sq / err.numel() / self.output_scale**2).detach(),
            fvu=fvu.detach(),
            auxk_loss=err_sq.new_zeros(()),
            codes=codes.detach(),
        )

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        super().after_optimizer_step()
        self.threshold.clamp_(min=_MIN_THRESHOLD)
