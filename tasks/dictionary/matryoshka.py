"""Matryoshka BatchTopK SAE (Bussmann et al. 2025; Nabeshima 2024): nested prefixes of the latents.

The latents are ordered; for each prefix size m in `prefixes`, the first m latents' codes alone reconstruct
the input, and the FVUs of all prefixes are summed. Early latents are pushed towards general features that
reconstruct on their own, later ones towards refinements, which curbs feature absorption. Codes come from one
batch top-k over all latents, so the inference threshold and encode/decode are BatchTopK's.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from schemas.methods import MatryoshkaConfig
from tasks.dictionary.base import TrainStepOutput
from tasks.dictionary.batchtopk import BatchTopKSAE
from tasks.dictionary.registry import register

_EPS = 1e-12


@register
class MatryoshkaSAE(BatchTopKSAE):
    """A BatchTopK SAE trained on the summed FVU of its nested prefixes."""

    method: ClassVar[str] = "matryoshka"
    config_cls: ClassVar[type[MatryoshkaConfig]] = MatryoshkaConfig
    cfg: MatryoshkaConfig

    def prefix_reconstructions(self, codes: Tensor) -> list[Tensor]:
        """Scaled reconstructions from each prefix, smallest first; codes [batch, d_sae].

        Built incrementally: each prefix adds its new block of latents to the previous reconstruction, so the
        cost is one full decode, not one per prefix.
        """
        recons, recon, start = [], self.b_dec.expand(codes.shape[0], -1), 0
        for end in self.cfg.prefix_sizes():
            recon = recon + codes[:, start:end] @ self.W_dec[start:end]
            recons.append(recon)
            start = end
        return recons

    def training_loss(self, acts: Tensor, dead_mask: Tensor) -> TrainStepOutput:
        """Sum over prefixes of FVU(prefix), plus `auxk_coef` x AuxK on the full reconstruction's residual."""
        x = acts.to(self.W_enc.dtype) * self.input_scale
        pre = self.pre_acts(x)
        codes = self._topk_codes(pre)
        var = (x - x.mean(0)).pow(2).sum().clamp_min(_EPS)
        recons = self.prefix_reconstructions(codes)
        prefix_fvus = [(x - r).pow(2).sum() / var for r in recons]
        err = x - recons[-1]
        err_sq = err.pow(2).sum()
        auxk = self.auxk_loss(pre, err.detach(), dead_mask)
        return TrainStepOutput(
            loss=sum(prefix_fvus) + self.cfg.auxk_coef * auxk,
            mse=(err_sq / err.numel() / self.input_scale**2).detach(),
            fvu=prefix_fvus[-1].detach(),
            auxk_loss=auxk.detach(),
            codes=codes.detach(),
        )
