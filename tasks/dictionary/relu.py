"""ReLU SAE with an L1 penalty (Bricken et al. 2023), and Anthropic's scaled-L1 variant (April 2024 update).

Plain: unit-norm decoder rows, loss = (||x - x_hat||^2 + l1_coef * sum_i |z_i|) summed over the batch.
Scaled L1: the decoder is unconstrained and each code is weighted by its row norm, |z_i| * ||W_dec_i||, so the
penalty cannot be dodged by shrinking codes and growing rows; the L1 weight warms up linearly over
`l1_warmup_steps`. Both losses are divided by the batch's summed variance, so the error term is the FVU.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from featureatlas.schemas.methods import ReLUConfig
from featureatlas.tasks.dictionary.base import TrainStepOutput
from featureatlas.tasks.dictionary.registry import register
from featureatlas.tasks.dictionary.sae_common import LinearSAE


@register
class ReLUSAE(LinearSAE):
    """codes = relu((x - b_dec) W_enc + b_enc); W_enc starts as W_dec.T in both variants."""

    method: ClassVar[str] = "relu"
    config_cls: ClassVar[type[ReLUConfig]] = ReLUConfig
    cfg: ReLUConfig

    def __init__(self, cfg: ReLUConfig, d_in: int) -> None:
        super().__init__(cfg, d_in)
        self.unit_norm_decoder = not cfg.scaled_l1

    def activation(self, pre: Tensor) -> Tensor:
        return pre.relu()

    def l1_weight(self) -> float:
        """The L1 coefficient at the current step: ramps from 0 to `l1_coef` over `l1_warmup_steps`."""
        warmup = self.cfg.l1_warmup_steps
        if warmup == 0:
            return self.cfg.l1_coef
        return self.cfg.l1_coef * min(1.0, (self.steps_taken + 1) / warmup)

    def sparsity_penalty(self, codes: Tensor) -> Tensor:
        """sum over the batch of |z_i|, times ||W_dec_i|| for the scaled variant; codes [batch, d_sae]."""
        if self.cfg.scaled_l1:
            return (codes.abs() * self.W_dec.norm(dim=-1)).sum()
        return codes.abs().sum()

    def training_loss(
        self,
        acts: Tensor,
        dead_mask: Tensor,  # noqa: ARG002
        target: Tensor | None = None,
    ) -> TrainStepOutput:
        x, y = self.sites(acts, target)  # y: what to reconstruct (x itself, or a transcoder's target)
        codes = self.activation(self.pre_acts(x))
        err = y - self.decode_scaled(codes)
        err_sq = err.pow(2).sum()
        var = self.batch_variance(y)
        fvu = err_sq / var
        return TrainStepOutput(
            loss=fvu + self.l1_weight() * self.sparsity_penalty(codes) / var,
            mse=(err_sq / err.numel() / self.output_scale**2).detach(),
            fvu=fvu.detach(),
            auxk_loss=err_sq.new_zeros(()),
            codes=codes.detach(),
        )
