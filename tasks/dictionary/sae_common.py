"""What the linear-encoder SAE variants share: parameters, input statistics, the decoder-norm constraint.

`LinearSAE` holds W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in] and everything that
does not depend on the activation function: fitting `input_scale` and `b_dec` from data (mean or geometric
median), decoding, and the unit-norm decoder rows with the parallel gradient removed. A method subclasses it,
writes `activation(pre) -> codes` and `training_loss`, and sets `unit_norm_decoder` if it constrains rows.
"""

from __future__ import annotations

import math
from abc import abstractmethod

import torch
from torch import Tensor, nn

from featureatlas.tasks.dictionary.base import Dictionary
from featureatlas.tasks.dictionary.transcoder import TranscoderSites

# Guards divisions by a batch variance or a row norm; far below any real value after input scaling.
EPS = 1e-12


def geometric_median(points: Tensor, iters: int = 100, tol: float = 1e-7) -> Tensor:
    """Weiszfeld's algorithm on points [n, d] (float64): the point minimising summed distances."""
    median = points.mean(0)
    for _ in range(iters):
        weights = 1.0 / (points - median).norm(dim=1).clamp_min(1e-12)
        new = (weights[:, None] * points).sum(0) / weights.sum()
        if (new - median).norm() <= tol * median.norm().clamp_min(1.0):
            return new
        median = new
    return median


@torch.no_grad()
def input_statistics(
    acts: Tensor, b_dec_init: str, chunk_rows: int = 65_536, median_rows: int = 16_384
) -> tuple[float, Tensor]:
    """(input_scale, b_dec in scaled units) for acts [n, d_in]: E||acts * scale||^2 = d_in.

    Sums run in float64 over row chunks: caches are large and often bfloat16, where a float32 running sum
    over millions of rows loses the digits that matter. The geometric median uses an evenly strided subsample.
    """
    n, d_in = acts.shape
    total = torch.zeros(d_in, dtype=torch.float64)
    sum_sq = torch.zeros((), dtype=torch.float64)
    for start in range(0, n, chunk_rows):
        chunk = acts[start : start + chunk_rows].to("cpu", torch.float64)
        total += chunk.sum(0)
        sum_sq += chunk.pow(2).sum()
    mean_sq_norm = float(sum_sq) / n
    if mean_sq_norm <= 0:
        raise ValueError("acts are all zero; input scaling needs activations with a nonzero norm")
    scale = math.sqrt(d_in / mean_sq_norm)
    match b_dec_init:
        case "mean":
            center = total / n
        case "geometric_median":
            stride = max(1, n // median_rows)
            center = geometric_median(acts[::stride].to("cpu", torch.float64))
        case "zeros":
            center = torch.zeros(d_in, dtype=torch.float64)
        case other:
            raise ValueError(f"b_dec_init {other!r} unknown; use 'mean', 'geometric_median' or 'zeros'")
    return scale, center * scale


class LinearSAE(TranscoderSites, Dictionary):
    """Base of the SAE variants with a linear encoder; parameters live in the scaled space."""

    # Whether the decoder rows stay on the unit sphere (gradient along them removed, renormalised each step).
    unit_norm_decoder: bool = True

    def __init__(self, cfg, d_in: int) -> None:
        super().__init__(cfg, d_in)
        self.W_enc = nn.Parameter(torch.empty(d_in, cfg.d_sae))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.W_dec = nn.Parameter(torch.empty(cfg.d_sae, d_in))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self._init_sites()
        self.steps_taken = 0  # optimizer steps so far, for penalty warm-ups (not saved: training-only)
        # Own generator: building (or loading) a dictionary must not advance the global RNG.
        self.reset_parameters(torch.Generator().manual_seed(cfg.seed))

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator) -> None:
        """Random unit-norm decoder rows and W_enc = W_dec.T (fewer latents die early)."""
        W_dec = torch.randn(self.d_sae, self.d_in, generator=generator)
        W_dec /= W_dec.norm(dim=-1, keepdim=True)
        self.W_dec.copy_(W_dec)
        self.W_enc.copy_(W_dec.T)
        self.b_enc.zero_()
        self.b_dec.zero_()

    @torch.no_grad()
    def init_from_data(self, acts: Tensor, targets: Tensor | None = None) -> None:
        """Fit `input_scale` and set b_dec per the config's `b_dec_init`; acts [n, d_in] raw.

        A transcoder also takes its `targets` [n, d_in]: `target_scale` and b_dec come from them.
        """
        self.check_targets(targets)
        scale, b_dec = input_statistics(acts, self.cfg.b_dec_init)
        self.input_scale.fill_(scale)
        if targets is not None:
            scale, b_dec = input_statistics(targets, self.cfg.b_dec_init)
        self.target_scale.fill_(scale)
        if self.b_dec.requires_grad:
            self.b_dec.copy_(b_dec.to(self.b_dec))

    def scaled(self, acts: Tensor) -> Tensor:
        # Cast before scaling: bfloat16 acts times a float32 0-dim scale would stay bfloat16.
        return acts.to(self.W_enc.dtype) * self.input_scale

    def pre_acts(self, x_scaled: Tensor) -> Tensor:
        """Encoder pre-activations [..., d_sae] of already scaled inputs."""
        return (x_scaled - self.input_center) @ self.W_enc + self.b_enc

    @abstractmethod
    def activation(self, pre: Tensor) -> Tensor:
        """pre-activations [..., d_sae] -> codes [..., d_sae] (inference form)."""

    def encode(self, acts: Tensor) -> Tensor:
        return self.activation(self.pre_acts(self.scaled(acts)))

    def decode_scaled(self, codes: Tensor) -> Tensor:
        return codes @ self.W_dec + self.b_dec

    def decode(self, codes: Tensor) -> Tensor:
        return self.decode_scaled(codes) / self.output_scale

    def decoder_directions(self) -> Tensor:
        """Decoder rows [d_sae, d_in], at unit length (a copy if the decoder is unconstrained)."""
        if self.unit_norm_decoder:
            return self.W_dec.detach()
        return self.W_dec.detach() / self.W_dec.detach().norm(dim=-1, keepdim=True).clamp_min(EPS)

    @staticmethod
    def batch_variance(x: Tensor) -> Tensor:
        """sum ||x - mean(x)||^2 over a batch [batch, d_in]: the FVU's denominator, shared by penalties."""
        return (x - x.mean(0)).pow(2).sum().clamp_min(EPS)

    # ---- training hooks (see tasks.dictionary.train.Trainable) --------------------------------------------

    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        """Drop the gradient along each decoder row: with unit-norm rows it would only change their length."""
        grad = self.W_dec.grad
        if self.unit_norm_decoder and grad is not None:
            grad -= (grad * self.W_dec).sum(-1, keepdim=True) * self.W_dec

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Put the decoder rows back on the unit sphere (Adam's step leaves them slightly off it)."""
        self.steps_taken += 1
        if self.unit_norm_decoder:
            self.W_dec /= self.W_dec.norm(dim=-1, keepdim=True).clamp_min(EPS)
