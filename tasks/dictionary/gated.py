"""Gated SAE (Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated SAEs").

Two paths share the encoder directions W_enc: the gate decides which latents fire,
    pi_gate = (x - b_dec) W_enc + b_gate,
and the magnitude path, rescaled per latent by exp(r_mag), decides how strongly,
    pi_mag = (x - b_dec) W_enc * exp(r_mag) + b_mag,    z = 1[pi_gate > 0] * relu(pi_mag).
The L1 penalty acts on relu(pi_gate) only, so it shrinks the gate, not the magnitudes; the step function
passes no gradient, so an auxiliary loss makes relu(pi_gate) reconstruct x through a frozen copy of the
decoder, giving the gate path its training signal (logged as `auxk_loss`, divided by the batch variance).
Decoder rows stay at unit norm.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from featureatlas.schemas.methods import GatedConfig
from featureatlas.tasks.dictionary.base import TrainStepOutput
from featureatlas.tasks.dictionary.registry import register
from featureatlas.tasks.dictionary.sae_common import LinearSAE


@register
class GatedSAE(LinearSAE):
    """W_enc [d_in, d_sae] shared; b_enc is the gate bias, r_mag and b_mag [d_sae] the magnitude path's."""

    method: ClassVar[str] = "gated"
    config_cls: ClassVar[type[GatedConfig]] = GatedConfig
    cfg: GatedConfig

    def __init__(self, cfg: GatedConfig, d_in: int) -> None:
        super().__init__(cfg, d_in)
        self.r_mag = nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_mag = nn.Parameter(torch.zeros(cfg.d_sae))

    def paths(self, x_scaled: Tensor) -> tuple[Tensor, Tensor]:
        """(pi_gate, pi_mag), each [..., d_sae], from one shared projection."""
        proj = (x_scaled - self.input_center) @ self.W_enc
        return proj + self.b_enc, proj * self.r_mag.exp() + self.b_mag

    def activation(self, pre: Tensor) -> Tensor:  # noqa: ARG002
        raise NotImplementedError("a gated SAE has two pre-activations; use encode(acts) or gated_codes")

    @staticmethod
    def gated_codes(pi_gate: Tensor, pi_mag: Tensor) -> Tensor:
        return (pi_gate > 0).to(pi_mag.dtype) * pi_mag.relu()

    def encode(self, acts: Tensor) -> Tensor:
        return self.gated_codes(*self.paths(self.scaled(acts)))

    def training_loss(
        self,
        acts: Tensor,
        dead_mask: Tensor,  # noqa: ARG002
        target: Tensor | None = None,
    ) -> TrainStepOutput:
        """(||x - x_hat||^2 + l1 * sum relu(pi_gate) ||d_i|| + ||x - x_hat_gate(frozen decoder)||^2) / var."""
        x, y = self.sites(acts, target)  # y: what to reconstruct (x itself, or a transcoder's target)
        pi_gate, pi_mag = self.paths(x)
        codes = self.gated_codes(pi_gate, pi_mag)
        err = y - self.decode_scaled(codes)
        err_sq = err.pow(2).sum()
        var = self.batch_variance(y)
        gate = pi_gate.relu()
        l1 = (gate * self.W_dec.norm(dim=-1).detach()).sum()
        aux = (y - (gate @ self.W_dec.detach() + self.b_dec.detach())).pow(2).sum()
        fvu = err_sq / var
        return TrainStepOutput(
            loss=fvu + (self.cfg.l1_coef * l1 + aux) / var,
            mse=(err_sq / err.numel() / self.output_scale**2).detach(),
            fvu=fvu.detach(),
            auxk_loss=(aux / var).detach(),
            codes=codes.detach(),
        )
