"""Matching-pursuit SAE: the encoder is greedy matching pursuit over a learned unit-norm dictionary.

Starting from r = x - b_dec, each step scores every atom by c = ReLU(W_dec r), takes the best, adds its score
to that latent's code and subtracts its projection from the residual. With unit-norm atoms and c = <r, w>,
||r - c w||^2 = ||r||^2 - c^2, so every step lowers (never raises) the reconstruction error: more steps at
inference trade speed for fidelity, and `k` at inference may differ from training. A token stops early once
its residual norm falls to `residual_threshold` times its starting norm, or when no atom has a positive score.

Unlike a linear encoder, pursuit explains away: once a parent direction is subtracted, its correlated children
no longer look active, which suits hierarchical (mutually exclusive) features. Gradients flow through the
selected scores (and the residual updates) into the atoms; the argmax choices are not differentiated.

Speed. A literal loop costs k dense [batch, d_in] x [d_in, d_sae] matmuls under autograd and keeps every
residual for the backward (a training step took ~170 matmuls' time and 3.8 GB at d_in 576, d_sae 4608, batch
4096, k 32 on CPU; this version ~15 and 1 GB, README "Training-step speed"). Here the choice of atoms and
the coefficients are split:

- Selection runs without autograd. Since r <- r - s a_i, the scores move by -s Gram[i] with
  Gram = W_dec W_dec^T: one matmul for the first scores and one for the Gram matrix, then k in-place row
  updates. When the Gram costs more than the direct matmuls (d_sae large against the batch) or would not fit,
  each step scores the residual directly instead (`_uses_gram`).
- The coefficients, given the chosen atoms a_1..a_k of a token, obey c_t = m_t (<a_t, r0> - sum_{s<t}
  <a_t, a_s> c_s) with m_t the fixed step masks: a unit lower-triangular k x k system per token, solved
  differentiably, so the gradients are those of the loop (through the selected scores and the residual
  updates, not through the argmax). The decode in training is the sparse sum_t c_t a_t, and the backward of
  the two is written out (`_SparsePursuit`): 2-4x faster than autograd's on CPU.
- `encode` without gradients stops after selection: its scores are the codes.
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from featureatlas.schemas.methods import MPConfig
from featureatlas.tasks.dictionary.base import Dictionary, TrainStepOutput
from featureatlas.tasks.dictionary.registry import register
from featureatlas.tasks.dictionary.scaling import fit_input_scale

_EPS = 1e-12
# The Gram path holds a [d_sae, d_sae] matrix; past this many entries (1 GiB at float32) it scores directly.
_MAX_GRAM_ENTRIES = 2**28


class Selection(NamedTuple):
    """Greedy choices for n tokens: atom indices, scores taken (0 on a zero step), step masks; all [n, k]."""

    idx: Tensor
    score: Tensor
    mask: Tensor


def _uses_gram(n_tokens: int, d_sae: int, d_in: int, k: int) -> bool:
    """Gram path: d_sae^2 d_in (Gram) + n d_sae d_in (first scores) + k n d_sae (row updates) multiply-adds,
    against k n d_sae d_in for k direct matmuls; row updates are memory-bound, counted 8x a multiply-add.
    At d_sae 4608, d_in 576, k 32 it switches at ~150 tokens; on CPU the Gram lost at 128 and won at 256."""
    if d_sae * d_sae > _MAX_GRAM_ENTRIES:
        return False
    gram = d_sae * d_sae * d_in + n_tokens * d_sae * d_in + 8 * k * n_tokens * d_sae
    return gram < k * n_tokens * d_sae * d_in


@torch.no_grad()
def select_atoms(r0: Tensor, atoms: Tensor, k: int, residual_threshold: float) -> Selection:
    """`k` greedy steps on residuals r0 [n, d_in] over atoms [d_sae, d_in], without autograd.

    Step semantics of the loop: take the atom of largest ReLU score; a token takes a zero step once its best
    score is <= 0 or its residual norm has fallen to `residual_threshold` x its starting norm. Repeats of an
    atom are allowed (the caller sums them).
    """
    n, d_sae = r0.shape[0], atoms.shape[0]
    idx = torch.zeros(n, k, dtype=torch.long, device=r0.device)
    score = r0.new_zeros(n, k)
    mask = torch.zeros(n, k, dtype=torch.bool, device=r0.device)
    # The norm test only matters with a positive threshold: with 0, ||r|| > 0 whenever some score is > 0.
    check_norm = residual_threshold > 0
    sq_norm = r0.pow(2).sum(-1)
    stop_sq = residual_threshold**2 * sq_norm
    gram = _uses_gram(n, d_sae, r0.shape[1], k)
    if gram:
        G = atoms @ atoms.T
        scores = r0 @ atoms.T  # [n, d_sae], updated in place
        buf = torch.empty_like(scores)
    else:
        r = r0.clone()
    for t in range(k):
        if not gram:
            scores = r @ atoms.T
        best, i = scores.max(dim=-1)
        m = best > 0
        if check_norm:
            m &= sq_norm > stop_sq
        s = best * m
        idx[:, t], score[:, t], mask[:, t] = i, s, m
        if t == k - 1:
            break
        if gram:
            # scores <- scores - s Gram[i]; ||r||^2 <- ||r||^2 - 2 s <r, a_i> + s^2 ||a_i||^2, <r, a_i> = s.
            torch.index_select(G, 0, i, out=buf)
            scores.addcmul_(buf, s.unsqueeze(-1), value=-1)
            if check_norm:
                sq_norm -= s * s * (2 - G[i, i])
        else:
            r.sub_(s.unsqueeze(-1) * atoms[i])
            if check_norm:
                sq_norm = r.pow(2).sum(-1)
    return Selection(idx, score, mask)


class _SparsePursuit(torch.autograd.Function):
    """(r0 [n, d_in], atoms_sel [n, k, d_in], mask [n, k]) -> (sum_t c_t a_t [n, d_in], c [n, k]).

    c solves M c = m p with M = I + diag(m) L_strict, p = atoms_sel r0, L = atoms_sel atoms_sel^T. The
    backward is written out so the [n, k, d_in] gradient is formed once (autograd sums four strided ones):
    with g = atoms_sel dx_hat + dc and y = M^-T g: dp = m y, dL_strict = -strict_lower((m y) c^T),
    d atoms_sel = (dL + dL^T) atoms_sel + c dx_hat^T + dp r0^T, dr0 = dp^T atoms_sel.
    """

    @staticmethod
    def forward(ctx, r0: Tensor, atoms_sel: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        m = mask.to(r0.dtype)
        p = (atoms_sel @ r0.unsqueeze(-1)).squeeze(-1)
        M = torch.tril(atoms_sel @ atoms_sel.transpose(-1, -2), diagonal=-1).mul_(m.unsqueeze(-1))
        c = torch.linalg.solve_triangular(M, (m * p).unsqueeze(-1), upper=False, unitriangular=True).squeeze(
            -1
        )
        x_hat = (c.unsqueeze(-2) @ atoms_sel).squeeze(-2)
        ctx.save_for_backward(r0, atoms_sel, m, M, c)
        return x_hat, c

    @staticmethod
    def backward(ctx, dx_hat: Tensor | None, dc: Tensor | None):
        r0, atoms_sel, m, M, c = ctx.saved_tensors
        g = torch.zeros_like(c) if dc is None else dc.clone()
        if dx_hat is not None:
            g += (atoms_sel @ dx_hat.unsqueeze(-1)).squeeze(-1)
        y = torch.linalg.solve_triangular(
            M.transpose(-1, -2), g.unsqueeze(-1), upper=True, unitriangular=True
        ).squeeze(-1)
        dp = m * y
        dL = torch.tril(dp.unsqueeze(-1) * c.unsqueeze(-2), diagonal=-1).neg_()
        d_atoms = (dL + dL.transpose(-1, -2)) @ atoms_sel
        if dx_hat is not None:
            d_atoms.addcmul_(c.unsqueeze(-1), dx_hat.unsqueeze(-2))
        d_atoms.addcmul_(dp.unsqueeze(-1), r0.unsqueeze(-2))
        d_r0 = (dp.unsqueeze(-2) @ atoms_sel).squeeze(-2)
        return d_r0, d_atoms, None


class Pursuit(NamedTuple):
    """Codes [n, d_sae]; with gradients also the sparse reconstruction sum_t c_t a_t [n, d_in] (no b_dec)."""

    codes: Tensor
    recon: Tensor | None


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

    def _pursue(self, x_scaled: Tensor, k: int) -> Pursuit:
        """`k` greedy steps on scaled inputs [n, d_in]; differentiable when autograd is on.

        Pursuit runs in float32 or wider and outside autocast: the in-place score updates would accumulate
        bfloat16 rounding over k steps, and the triangular solve has no half-precision kernels. Codes and
        reconstruction come back in the weights' dtype.
        """
        dtype = self.W_dec.dtype
        work = torch.promote_types(dtype, torch.float32)
        with torch.autocast(x_scaled.device.type, enabled=False):
            atoms = self.atoms().to(work)
            r0 = x_scaled.to(work) - self.b_dec.to(work)
            sel = select_atoms(r0.detach(), atoms.detach(), k, self.cfg.residual_threshold)
            codes = x_scaled.new_zeros(r0.shape[0], self.d_sae, dtype=dtype)
            if not (torch.is_grad_enabled() and (r0.requires_grad or atoms.requires_grad)):
                return Pursuit(codes.scatter_add_(-1, sel.idx, sel.score.to(dtype)), None)
            # atoms[idx] [n, k, d_in]: its backward scatters the atoms' gradients into W_dec.
            recon, coef = _SparsePursuit.apply(r0, atoms[sel.idx], sel.mask)
        return Pursuit(codes.scatter_add(-1, sel.idx, coef.to(dtype)), recon.to(dtype))

    def pursuit(self, x_scaled: Tensor, k: int) -> Tensor:
        """Codes [..., d_sae] of `k` greedy steps on already scaled inputs [..., d_in]."""
        lead = x_scaled.shape[:-1]
        codes = self._pursue(x_scaled.reshape(-1, self.d_in), k).codes
        return codes.reshape(*lead, self.d_sae)

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
        out = self._pursue(x, self.k)
        # The sparse decode sum_t c_t a_t: no dense [batch, d_sae] x [d_sae, d_in] (under no_grad: the codes).
        recon = out.codes @ self.atoms() if out.recon is None else out.recon
        x_hat = recon + self.b_dec
        err = x - x_hat
        err_sq = err.pow(2).sum()
        fvu = err_sq / (x - x.mean(0)).pow(2).sum().clamp_min(_EPS)
        return TrainStepOutput(
            loss=fvu,
            mse=(err_sq / err.numel() / self.input_scale**2).detach(),
            fvu=fvu.detach(),
            auxk_loss=fvu.new_zeros(()),
            codes=out.codes.detach(),
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
