"""Threshold-activated SAE ("Towards Atoms of Large Language Models"): z = (W_enc x) * 1[W_enc x >= tau].

One global threshold tau, fixed during training: a pre-activation either passes unchanged or is zeroed, so
the codes are not shrunk the way a ReLU with a bias shrinks them. With the ideal encoder (rows are the true
directions of orthonormal features) and tau inside the admissible window (above every inactive
pre-activation, at or below every active one) the codes equal the true coefficients exactly. Gradients flow
through the kept entries only (the indicator has zero derivative almost everywhere). By default the paper's
bias-free form: b_enc and b_dec stay zero and are not trained.

tau only means something against the spread of the pre-activations, which depends on the data: inputs are
scaled to E||x||^2 = d_in, so a random direction's projection has a standard deviation near 1, and a latent
aligned with a feature sees that feature's scaled coefficient (about sqrt(d_in / L0) for L0 active
features) plus interference from the others of about the same spread. A fixed tau = 0.5 sat inside that
interference: on a planted toy every latent fired on noise (L0 32) and no feature was recovered. By default
(`tau` None) tau is therefore fitted at initialisation: `tau_sigmas` robust standard deviations (1.4826 x
the median absolute deviation) of the initial encoder's pre-activations on the training sample, a firing
test a latent's noise passes on ~2% of tokens at 2 sigmas. The fitted value is saved in cfg.json
(`fitted_tau`) and stays fixed during training; an explicit `tau` is used as given.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
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

    fitted_scalars: ClassVar[tuple[str, ...]] = (*LinearSAE.fitted_scalars, "fitted_tau")
    # Rows of the training sample whose initial pre-activations set tau (plenty for a median).
    tau_sample_rows: ClassVar[int] = 4096

    def __init__(self, cfg: ThresholdConfig, d_in: int) -> None:
        super().__init__(cfg, d_in)
        if not cfg.use_bias:
            self.b_enc.requires_grad_(False)
            self.b_dec.requires_grad_(False)
        # NaN until fitted: encoding with an unfitted automatic tau fails loudly instead of firing on noise.
        tau = float("nan") if cfg.tau is None else cfg.tau
        self.register_buffer("fitted_tau", torch.tensor(tau), persistent=False)

    @classmethod
    def upgrade_cfg(cls, raw: dict[str, Any]) -> dict[str, Any]:
        raw = super().upgrade_cfg(raw)
        # Saved before tau could be fitted: the config's tau (then always set) was the threshold.
        raw.setdefault("fitted_tau", raw.get("tau"))
        return raw

    @torch.no_grad()
    def init_from_data(self, acts: Tensor, targets: Tensor | None = None) -> None:
        """Input statistics as every linear SAE; then, when `tau` is None, tau from the pre-activations."""
        super().init_from_data(acts, targets)
        if self.cfg.tau is not None:
            return
        stride = max(1, acts.shape[0] // self.tau_sample_rows)
        pre = self.pre_acts(self.scaled(acts[::stride])).flatten().double()
        sigma = 1.4826 * (pre - pre.median()).abs().median()
        self.fitted_tau.fill_(float(self.cfg.tau_sigmas * sigma))

    def activation(self, pre: Tensor) -> Tensor:
        if torch.isnan(self.fitted_tau):
            raise ValueError(
                "this threshold SAE fits tau from data (tau None) but was not initialised; call "
                "init_from_data(acts) first (train_dictionary does), or set tau in its config"
            )
        return pre * (pre >= self.fitted_tau).to(pre.dtype)

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
