"""Reconstruction metrics of a dictionary on held-out activations: FVU, MSE, L0 and the share of dead latents.

The activations are streamed through the dictionary in batches, but every figure is a whole-set figure: FVU
divides the summed squared error by the summed squared distance to the mean of *all* rows, not an average of
per-batch FVUs (which would weigh small batches wrongly and use a noisy per-batch mean).
"""

from __future__ import annotations

import logging

import torch
from pydantic import Field
from torch import Tensor, nn

from schemas.base import Contract

log = logging.getLogger(__name__)

__all__ = ["ReconstructionMetrics", "dictionary_placement", "reconstruction_metrics", "same_device"]


class ReconstructionMetrics(Contract):
    """Whole-set reconstruction figures of one dictionary on one set of activations."""

    n_tokens: int = Field(description="Activation rows the figures were computed on.")
    fvu: float = Field(
        description="Fraction of variance unexplained: sum ||x - x_hat||^2 / sum ||x - mean||^2"
    )
    explained_variance: float = Field(description="1 - fvu.")
    mse: float = Field(description="Mean over tokens of ||x - x_hat||^2 / d_in.")
    l0: float = Field(description="Mean number of nonzero codes per token.")
    dead_fraction: float = Field(description="Share of latents that were zero on every row.")


def dictionary_placement(
    dictionary: nn.Module, device: torch.device | str, dtype: torch.dtype
) -> tuple[torch.device, torch.dtype]:
    """Where and in which dtype the dictionary computes: its parameters' device and dtype, else the fallbacks.

    A dictionary without parameters (a fixed transform) runs wherever its inputs are.
    """
    param = next(iter(dictionary.parameters()), None)
    if param is None:
        return torch.device(device), dtype
    return param.device, param.dtype


def same_device(a: torch.device, b: torch.device) -> bool:
    """Whether two devices are the same, reading a missing index ('cuda' vs 'cuda:0') as a match."""
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


@torch.no_grad()
def reconstruction_metrics(
    dictionary: nn.Module, acts: Tensor, *, batch_size: int = 4096, device: torch.device | str = "cpu"
) -> ReconstructionMetrics:
    """FVU, explained variance, MSE, L0 and dead fraction of `dictionary` on `acts [n, d_in]`.

    Rows are moved to `device` (where the dictionary must live) `batch_size` at a time and cast to the
    dictionary's dtype; the sums are kept in float64 so millions of rows add up without losing digits.
    """
    if acts.ndim != 2 or acts.shape[1] != dictionary.d_in:
        raise ValueError(
            f"acts must be [n, d_in] = [n, {dictionary.d_in}] for this dictionary, got {list(acts.shape)}; "
            "flatten [batch, seq, d] with acts.reshape(-1, d), and use the dictionary's own hookpoint"
        )
    if acts.shape[0] == 0:
        raise ValueError("acts has no rows; evaluate on at least two held-out tokens")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dict_device, dict_dtype = dictionary_placement(dictionary, device, acts.dtype)
    if not same_device(dict_device, torch.device(device)):
        raise ValueError(
            f"the dictionary lives on {dict_device} but device={str(device)!r}; "
            f"pass device={str(dict_device)!r} or move it first with dictionary.to({str(device)!r})"
        )

    d_in, n = dictionary.d_in, acts.shape[0]
    # Running mean and sum of squared deviations, merged batch by batch (Chan et al.): one pass, stable.
    mean = torch.zeros(d_in, dtype=torch.float64, device=dict_device)
    sq_dev = torch.zeros((), dtype=torch.float64, device=dict_device)
    sq_err = torch.zeros((), dtype=torch.float64, device=dict_device)
    active = torch.zeros((), dtype=torch.float64, device=dict_device)
    fired: Tensor | None = None
    seen = 0
    for start in range(0, n, batch_size):
        x = acts[start : start + batch_size].to(dict_device)
        codes = dictionary.encode(x.to(dict_dtype))
        x_hat = dictionary.decode(codes)
        x64 = x.double()
        sq_err += (x64 - x_hat.double()).pow(2).sum()

        b = x64.shape[0]
        batch_mean = x64.mean(dim=0)
        delta = batch_mean - mean
        sq_dev += (x64 - batch_mean).pow(2).sum() + delta.pow(2).sum() * (seen * b / (seen + b))
        mean += delta * (b / (seen + b))
        seen += b

        nonzero = codes != 0
        active += nonzero.sum(dtype=torch.float64)
        fired = nonzero.any(dim=0) if fired is None else fired | nonzero.any(dim=0)

    if sq_dev.item() == 0.0:
        raise ValueError(
            f"the {n} activation rows are all identical, so their variance is 0 and FVU is undefined; "
            "evaluate on more (and different) held-out tokens"
        )
    fvu = (sq_err / sq_dev).item()
    metrics = ReconstructionMetrics(
        n_tokens=n,
        fvu=fvu,
        explained_variance=1.0 - fvu,
        mse=(sq_err / (n * d_in)).item(),
        l0=(active / n).item(),
        dead_fraction=1.0 - fired.double().mean().item(),
    )
    log.info(
        "reconstruction on %d tokens: fvu=%.4f l0=%.1f dead=%.3f", n, fvu, metrics.l0, metrics.dead_fraction
    )
    return metrics
