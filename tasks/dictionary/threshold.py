"""Threshold-activated SAE ("Towards Atoms of Large Language Models"): z = (W_enc x) * 1[W_enc x >= tau].

One global threshold tau, fixed during training: a pre-activation either passes unchanged or is zeroed, so
the codes are not shrunk the way a ReLU with a bias shrinks them. With the ideal encoder (rows are the true
directions of orthonormal features) and tau inside the admissible window (above every inactive
pre-activation, at or below every active one) the codes equal the true coefficients exactly. Gradients flow
through the kept entries only (the indicator has zero derivative almost everywhere). By default the paper's
bias-free form: b_enc and b_dec stay zero and are not trained.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from featureatlas.schemas.methods import ThresholdConfig
from featureatlas.tasks.dictionary.base import TrainStepOutput
from featureatlas.tasks.dictionary.registry import register
from featureatlas.tasks.dictionary.sae_common import LinearSAE


@register
class ThresholdSAE(LinearSAE):
    """codes = pre * 1[pre >= tau], pre = (x - b_dec) W_enc + b_enc; unit-norm decoder rows."""

    method: ClassVar[str] = "threshold"
    config_cls: ClassVar[type[ThresholdConfig]] = ThresholdConfig
    cfg: ThresholdConfig

    def __init__(self, cfg: ThresholdConfig, d_in: int) -> None:
        super().__init__(cfg, d_in)
        if not cfg.use_bias:
            self.b_enc.requires_grad_(False)
            self.b_dec.requires_grad_(False)

    def activation(self, pre: Tensor) -> Tensor:
        return pre * (pre >= self.cfg.tau).to(pre.dtype)

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
        fvu = err_sq / self.batch_variance(y)
        return TrainStepOutput(
            loss=fvu,
            mse=(err_sq / err.numel() / self.output_scale**2).detach(),
            fvu=fvu.detach(),
            auxk_loss=err_sq.new_zeros(()),
            codes=codes.detach(),
        )
