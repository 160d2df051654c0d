"""Matryoshka BatchTopK SAE (Bussmann et al. 2025; Nabeshima 2024): nested prefixes of the latents.

The latents are ordered; for each prefix size m in `prefixes`, the first m latents' codes alone reconstruct
the input, and the FVUs of all prefixes are summed. Early latents are pushed towards general features that
reconstruct on their own, later ones towards refinements, which curbs feature absorption. Codes come from one
batch top-k over all latents, so the inference threshold and encode/decode are BatchTopK's.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from featureatlas.schemas.methods import MatryoshkaConfig
from featureatlas.tasks.dictionary.batchtopk import BatchTopKSAE
from featureatlas.tasks.dictionary.registry import register
from featureatlas.tasks.dictionary.sparse_decoder import SparseCodes, bag_sum, row_offsets


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

    def reconstructions(self, codes: Tensor) -> list[Tensor]:
        return self.prefix_reconstructions(codes)

    def sparse_reconstructions(self, codes: SparseCodes) -> list[Tensor]:
        """`prefix_reconstructions` from sparse codes, in one gather over all prefix blocks.

        Each entry goes to the bag (block of its latent, token); the bags' sums [blocks, tokens, d_in] are
        the blocks' contributions, and their running sum over blocks gives the prefixes' reconstructions.
        """
        sizes = self.cfg.prefix_sizes()
        n_blocks, n_rows = len(sizes), codes.n_rows
        bounds = torch.tensor(sizes[:-1], device=codes.cols.device)
        key = torch.bucketize(codes.cols, bounds, right=True) * n_rows + codes.rows
        order = torch.argsort(key, stable=True)
        parts = bag_sum(
            codes.cols[order], self.W_dec, codes.values[order], row_offsets(key[order], n_blocks * n_rows)
        )
        # A running sum by hand: cumsum's backward (flip, cumsum, flip) costs more than these few adds.
        recons, recon = [], self.b_dec
        for part in parts.view(n_blocks, n_rows, -1).unbind(0):
            recon = recon + part
            recons.append(recon)
        return recons

    def reconstruction_loss(self, fvus: list[Tensor]) -> Tensor:
        """Sum over prefixes of FVU(prefix); the caller adds AuxK on the full reconstruction's residual."""
        return sum(fvus[1:], fvus[0])
