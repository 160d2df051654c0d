"""Matching-pursuit SAE: the encoder is greedy matching pursuit over a learned unit-norm dictionary.

Starting from r = x - b_dec, each step scores every atom by c = ReLU(W_dec r), takes the best, adds its score
to that latent's code and subtracts its projection from the residual. With unit-norm atoms and c = <r, w>,
||r - c w||^2 = ||r||^2 - c^2, so every step lowers (never raises) the reconstruction error: more steps at
inference trade speed for fidelity, and `k` at inference may differ from training. A token stops early once
its residual norm falls to `residual_threshold` times its starting norm, or when no atom has a positive score.

Unlike a linear encoder, pursuit explains away: once a parent direction is subtracted, its correlated children
no longer look active, which suits hierarchical (mutually exclusive) features. Gradients flow through the
selected scores (and the residual updates) into the atoms; the argmax choices are not differentiated.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from schemas.methods import MPConfig
from tasks.dictionary.base import Dictionary, TrainStepOutput
from tasks.dictionary.registry import register
from tasks.dictionary.scaling import fit_input_scale

_EPS = 1e-12


@register
class MPSAE(Dictionary):
    """W_dec [d_sae, d_in] (unit-norm rows, the atoms) and b_dec [d_in], in the scaled space."""

    method: ClassVar[str] = "mp"
    config_cls: ClassVar[type[MPConfig]] = MPConfig
    cfg: MPConfig

    def __init__(self, cfg: MPConfig, d_in: int) -> None:
        super().__init__(cfg, d_in)
        self.k = cfg.k
        self.W_dec = nn.Parameter(torch.empty(cfg.d_sae, d_in))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        g = torch.Generator().manual_seed(cfg.seed)
        with torch.no_grad():
            W = torch.randn(cfg.d_sae, d_in, generator=g)
            self.W_dec.copy_(W / W.norm(dim=-1, keepdim=True))

    @torch.no_grad()
    def init_from_data(self, acts: Tensor) -> None:
        """Fit `input_scale` so E||acts * scale||^2 = d_in; set b_dec to the scaled mean."""
        stats = fit_input_scale(acts, target_sq_norm=float(self.d_in))
        self.input_scale.fill_(stats.scale)
        self.b_dec.copy_(stats.scaled_mean.to(self.b_dec))

    def atoms(self) -> Tensor:
        """W_dec with rows renormalised: training keeps them unit-norm; this keeps pursuit exact anyway."""
        return self.W_dec / self.W_dec.norm(dim=-1, keepdim=True).clamp_min(_EPS)

    def pursuit(self, x_scaled: Tensor, k: int) -> Tensor:
        """Codes [..., d_sae] of `k` greedy steps on already scaled inputs [..., d_in]."""
        atoms = self.atoms()
        r = x_scaled - self.b_dec
        stop_norm = self.cfg.residual_threshold * r.detach().norm(dim=-1)
        codes = r.new_zeros(*r.shape[:-1], self.d_sae)
        for _ in range(k):
            score, idx = (r @ atoms.T).relu().max(dim=-1)
            # Finished tokens (small residual, or nothing left with a positive score) take a zero step.
            score = score * (r.detach().norm(dim=-1) > stop_norm)
            codes = codes.scatter_add(-1, idx.unsqueeze(-1), score.unsqueeze(-1))
            r = r - score.unsqueeze(-1) * atoms[idx]
        return codes

    def encode(self, acts: Tensor, k: int | None = None) -> Tensor:
        """Codes of `k` pursuit steps (default: the training `k`)."""
        steps = self.k if k is None else k
        if steps < 1:
            raise ValueError(f"k must be >= 1 pursuit steps, got {steps}")
        return self.pursuit(acts.to(self.W_dec.dtype) * self.input_scale, steps)

    def decode(self, codes: Tensor) -> Tensor:
        return (codes @ self.atoms() + self.b_dec) / self.input_scale

    def decoder_directions(self) -> Tensor:
        return self.atoms().detach()

    # ---- training hooks (see tasks.dictionary.train.Trainable) --------------------------------------------

    def training_loss(self, acts: Tensor, dead_mask: Tensor) -> TrainStepOutput:  # noqa: ARG002
        """FVU of the batch in the scaled space (as for TopK); acts [batch, d_in] raw."""
        x = acts.to(self.W_dec.dtype) * self.input_scale
        codes = self.pursuit(x, self.k)
        err = x - (codes @ self.atoms() + self.b_dec)
        err_sq = err.pow(2).sum()
        fvu = err_sq / (x - x.mean(0)).pow(2).sum().clamp_min(_EPS)
        return TrainStepOutput(
            loss=fvu,
            mse=(err_sq / err.numel() / self.input_scale**2).detach(),
            fvu=fvu.detach(),
            auxk_loss=fvu.new_zeros(()),
            codes=codes.detach(),
        )

    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        """Drop the gradient along each atom: with unit-norm atoms it would only change their length."""
        grad = self.W_dec.grad
        if grad is not None:
            grad -= (grad * self.W_dec).sum(-1, keepdim=True) * self.W_dec

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=-1, keepdim=True).clamp_min(_EPS)
