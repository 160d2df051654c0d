"""TopK sparse autoencoder (Gao et al. 2024, "Scaling and evaluating sparse autoencoders").

The encoder keeps the k largest pre-activations per token and zeroes the rest, so sparsity is set directly by
`k` rather than through an L1 penalty (which shrinks the surviving codes). The decoder rows are kept at unit
norm: the codes then carry the magnitudes, and decoder rows are comparable directions across latents.

Latents that stop firing are revived by the AuxK loss (appendix A.2): the dead latents' own top
pre-activations must reconstruct what the live ones missed, which gives them a gradient towards the data.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from featureatlas.schemas.methods import TopKConfig
from featureatlas.tasks.dictionary.base import Dictionary, TrainStepOutput
from featureatlas.tasks.dictionary.registry import register
from featureatlas.tasks.dictionary.sae_common import input_statistics
from featureatlas.tasks.dictionary.sparse_decoder import (
    SparseCodes,
    per_row_entries,
    select_codes,
    sparse_decode,
    sparse_encode,
    use_sparse_path,
)
from featureatlas.tasks.dictionary.transcoder import TranscoderSites

# Guards the divisions by a batch variance; far below any real activation variance after input scaling.
_EPS = 1e-12


@register
class TopKSAE(TranscoderSites, Dictionary):
    """W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in] (unit-norm rows), b_dec [d_in].

    Parameters live in the scaled space (acts * input_scale); `encode`/`decode` take and give raw activations.
    As a transcoder (`cfg.target_hookpoint` set) it reconstructs another hookpoint's activations; see
    tasks.dictionary.transcoder.
    """

    method: ClassVar[str] = "topk"
    config_cls: ClassVar[type[TopKConfig]] = TopKConfig
    cfg: TopKConfig
    # Training path: None picks per device (tasks.dictionary.sparse_decoder.use_sparse_path), True forces the
    # sparse decoder, False the dense one. Not saved: it changes speed, not results.
    sparse_decoder: bool | None = None

    def __init__(self, cfg: TopKConfig, d_in: int) -> None:
        super().__init__(cfg, d_in)
        self.k = cfg.k
        self.W_enc = nn.Parameter(torch.empty(d_in, cfg.d_sae))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.W_dec = nn.Parameter(torch.empty(cfg.d_sae, d_in))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self._init_sites()
        # Own generator: building (or loading) a dictionary must not advance the global RNG.
        self.reset_parameters(torch.Generator().manual_seed(cfg.seed))

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator) -> None:
        """Random unit-norm decoder rows and W_enc = W_dec.T (Gao et al.: fewer latents die early)."""
        W_dec = torch.randn(self.d_sae, self.d_in, generator=generator)
        W_dec /= W_dec.norm(dim=-1, keepdim=True)
        self.W_dec.copy_(W_dec)
        self.W_enc.copy_(W_dec.T)
        self.b_enc.zero_()
        self.b_dec.zero_()

    @classmethod
    def upgrade_cfg(cls, raw: dict) -> dict:
        """Dictionaries saved before `unit_grad_norm` existed were trained without it."""
        raw = super().upgrade_cfg(raw)
        raw.setdefault("unit_grad_norm", False)
        return raw

    @torch.no_grad()
    def init_from_data(self, acts: Tensor, targets: Tensor | None = None) -> None:
        """Fit `input_scale` so E||acts * scale||^2 = d_in; set b_dec per `b_dec_init`
        (default: the geometric median).

        A transcoder also takes its `targets` [n, d_in] (rows aligned with acts): `target_scale` and b_dec
        come from them.
        """
        self.check_targets(targets)
        scale, b_dec = input_statistics(acts, self.cfg.b_dec_init)
        self.input_scale.fill_(scale)
        if targets is not None:
            scale, b_dec = input_statistics(targets, self.cfg.b_dec_init)
        self.target_scale.fill_(scale)
        self.b_dec.copy_(b_dec.to(self.b_dec))

    def pre_acts(self, x_scaled: Tensor) -> Tensor:
        """Encoder pre-activations [..., d_sae] of already scaled inputs."""
        return (x_scaled - self.input_center) @ self.W_enc + self.b_enc

    def _topk_codes(self, pre: Tensor) -> Tensor:
        # ReLU after the top-k: a token whose k-th largest pre-activation is negative gets fewer than k codes.
        top = pre.topk(self.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())

    def encode(self, acts: Tensor) -> Tensor:
        # Cast before scaling: bfloat16 acts times a float32 0-dim scale would stay bfloat16.
        return self._topk_codes(self.pre_acts(acts.to(self.W_enc.dtype) * self.input_scale))

    def decode(self, codes: Tensor) -> Tensor:
        return (codes @ self.W_dec + self.b_dec) / self.output_scale

    def decoder_directions(self) -> Tensor:
        """The unit-norm decoder rows [d_sae, d_in] (a detached view; clone before modifying)."""
        return self.W_dec.detach()

    # ---- training hooks (see tasks.dictionary.train.Trainable) --------------------------------------------

    def training_loss(
        self, acts: Tensor, dead_mask: Tensor | None, target: Tensor | None = None
    ) -> TrainStepOutput:
        """FVU of the batch plus `auxk_coef` x AuxK, all in the scaled space; acts [batch, d_in] raw.

        `dead_mask` [d_sae] bool marks the latents AuxK revives; None says that none can be dead (the trainer
        knows it without reading the device), which skips the AuxK selection.
        A transcoder reconstructs `target` [batch, d_in] (raw, rows aligned with acts) instead of acts.
        Runs the sparse path (tasks.dictionary.sparse_decoder) unless `sparse_decoder` is False; both give the
        same losses and gradients up to float rounding.
        """
        x, y = self.sites(acts, target)
        center = self.input_center
        if use_sparse_path(self.sparse_decoder, x.device):
            with torch.no_grad():  # the dense pre-activations only choose the codes; no graph is kept
                pre = torch.addmm(self.b_enc, x - center, self.W_enc)
                aux_entries = self._aux_entries(pre, dead_mask)
                enc = sparse_encode(pre, *self._select_entries(pre))
            sparse = select_codes(
                x, center, self.W_enc, self.b_enc, enc.rows, enc.cols, enc.values, x.shape[0]
            )
            recons = self.sparse_reconstructions(sparse)
            codes = enc.codes

            def auxk(err: Tensor) -> Tensor:
                return self.sparse_auxk_loss(x, aux_entries, err, dead_mask)
        else:
            pre = self.pre_acts(x)
            codes = self._topk_codes(pre)
            recons = self.reconstructions(codes)

            def auxk(err: Tensor) -> Tensor:
                return self.auxk_loss(pre, err, dead_mask)

        var = (y - y.mean(0)).pow(2).sum().clamp_min(_EPS)
        # mse_loss fuses the difference, square and sum (and its backward) into one pass per reconstruction
        fvus = [F.mse_loss(r, y, reduction="sum") / var for r in recons]
        with torch.no_grad():
            err = y - recons[-1]
        aux = auxk(err)
        return TrainStepOutput(
            loss=self.reconstruction_loss(fvus) + self.cfg.auxk_coef * aux,
            mse=(fvus[-1].detach() * var / err.numel() / self.output_scale**2),
            fvu=fvus[-1].detach(),
            auxk_loss=aux.detach(),
            codes=codes,
        )

    def reconstructions(self, codes: Tensor) -> list[Tensor]:
        """The scaled reconstructions the loss compares with the input (one here; Matryoshka has several)."""
        return [codes @ self.W_dec + self.b_dec]

    def sparse_reconstructions(self, codes: SparseCodes) -> list[Tensor]:
        """`reconstructions` from sparse codes, gathering only the selected decoder rows."""
        return [sparse_decode(codes, self.W_dec) + self.b_dec]

    def reconstruction_loss(self, fvus: list[Tensor]) -> Tensor:
        """The loss from the FVU of each reconstruction (TopK: its only one)."""
        return fvus[-1]

    def _select_entries(self, pre: Tensor) -> tuple[Tensor, Tensor]:
        """(rows, cols) of the codes `_topk_codes(pre)` may make nonzero, sorted by row; pre detached."""
        return per_row_entries(pre.topk(self.k, dim=-1, sorted=False).indices)

    def _aux_k(self, dead_mask: Tensor | None) -> int:
        """k_aux = min(d_in // 2, d_sae); 0 when no latent can be dead (`dead_mask` None) or AuxK is off.

        Gao et al. take min(d_in // 2, n_dead); counting n_dead would read the GPU every step (and break a
        compiled graph), so the selection takes the fixed k_aux and `_aux_values` zeroes the live latents it
        picks when fewer are dead: the same codes, hence the same loss and gradients.
        """
        if dead_mask is None or self.cfg.auxk_coef == 0:
            return 0
        return min(max(self.d_in // 2, 1), self.d_sae)

    @staticmethod
    def _aux_values(values: Tensor) -> Tensor:
        """The -inf of live latents picked by the AuxK selection as 0 (a code of 0 contributes nothing)."""
        return values.masked_fill(values == -math.inf, 0.0)

    def auxk_loss(self, pre: Tensor, err: Tensor, dead_mask: Tensor | None) -> Tensor:
        """How badly the dead latents' top-k_aux pre-activations reconstruct the residual `err` [batch, d_in].

        Normalised by sum(err^2), so 1 means the dead latents explain none of the residual; the reconstruction
        has no bias, so it must explain err's mean too, and the uncentred sum keeps that floor at exactly 1.
        Exactly 0 (not NaN) when nothing is dead or the loss is switched off.
        """
        k_aux = self._aux_k(dead_mask)
        if k_aux == 0:
            return pre.new_zeros(())
        # Live latents get -inf so the top-k_aux picks dead ones first.
        top = pre.masked_fill(~dead_mask, -math.inf).topk(k_aux, dim=-1, sorted=False)
        aux_codes = torch.zeros_like(pre).scatter(-1, top.indices, self._aux_values(top.values).relu())
        err_hat = aux_codes @ self.W_dec
        return self._normalised_aux(err, err_hat, dead_mask)

    @staticmethod
    def _normalised_aux(err: Tensor, err_hat: Tensor, dead_mask: Tensor) -> Tensor:
        # Times any(dead): 0 rather than 1 when the mask is all False, without reading it on the host.
        loss = (err - err_hat).pow(2).sum() / err.pow(2).sum().clamp_min(_EPS)
        return loss * dead_mask.any()

    def _aux_entries(self, pre: Tensor, dead_mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor] | None:
        """(rows, cols, pre values) of the AuxK selection from detached `pre`; None when AuxK is off."""
        k_aux = self._aux_k(dead_mask)
        if k_aux == 0:
            return None
        top = pre.masked_fill(~dead_mask, -math.inf).topk(k_aux, dim=-1, sorted=False)
        rows, cols = per_row_entries(top.indices)
        return rows, cols, self._aux_values(top.values).reshape(-1)

    def sparse_auxk_loss(
        self, x: Tensor, entries: tuple[Tensor, Tensor, Tensor] | None, err: Tensor, dead_mask: Tensor | None
    ) -> Tensor:
        """`auxk_loss` on the sparse path, from the entries `_aux_entries` chose; x [batch, d_in] scaled."""
        if entries is None:
            return err.new_zeros(())
        aux = select_codes(x, self.input_center, self.W_enc, self.b_enc, *entries, x.shape[0])
        err_hat = sparse_decode(aux, self.W_dec)
        return self._normalised_aux(err, err_hat, dead_mask)

    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        """Drop the gradient along each decoder row (with unit-norm rows it would only change their length),
        then, with `unit_grad_norm`, scale the whole gradient to unit L2 norm.

        Why the normalisation: Adam divides by the root of a running mean of squared gradients whose memory
        (beta2 0.999: ~1000 steps) outlasts most runs. The gradient shrinks as the loss falls (on SmolLM2
        activations the decoder's halves in 40 steps), so that mean stays dominated by the first, large
        gradients and every later step comes out smaller: a decay of the learning rate nobody asked for.
        With unit-norm gradients Adam's steps follow the lr schedule alone. (dictionary_learning gets the same
        by clipping at norm 1 a raw-unit loss whose gradient norm is far above 1 on every step.) The norm
        stays a device tensor: no host sync, and `torch.compile` sees no data-dependent branch.
        """
        grad = self.W_dec.grad
        if grad is not None:
            grad -= (grad * self.W_dec).sum(-1, keepdim=True) * self.W_dec
        if getattr(self.cfg, "unit_grad_norm", False):
            grads = [p.grad for p in self.parameters() if p.grad is not None]
            if grads:
                total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
                torch._foreach_div_(grads, total.clamp_min(_EPS))

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Put the decoder rows back on the unit sphere (Adam's step leaves them slightly off it)."""
        self.W_dec /= self.W_dec.norm(dim=-1, keepdim=True).clamp_min(_EPS)
