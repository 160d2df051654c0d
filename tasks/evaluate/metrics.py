"""Reconstruction metrics of a dictionary on held-out activations: FVU, MSE, L0 and the share of dead latents.

The activations are streamed through the dictionary in batches, but every figure is a whole-set figure: FVU
divides the summed squared error by the summed squared distance to the mean of *all* rows, not an average of
per-batch FVUs (which would weigh small batches wrongly and use a noisy per-batch mean). That older figure
is still reported, as `fvu_batch_mean`, because earlier papers and dashboards quote it.

Sparsity is described beyond L0 and dead latents: the share of dense latents (firing on more than
`dense_threshold` of the tokens) and a histogram of log10 firing frequencies over all latents.

A code "fires" when the dictionary's own `active(codes)` says so (`firing_mask`), the one definition that
training metrics, evaluation, ablation and labeling share. For the SAE variants it is `codes > 0`; semi-NMF's
least-squares codes are never exactly 0, and counting `codes != 0` would report every latent firing on every
token (L0 = d_sae, no dead latents).
"""

from __future__ import annotations

import logging
import math

import torch
from pydantic import Field
from torch import Tensor, nn

from featureatlas.schemas.base import Contract

log = logging.getLogger(__name__)

__all__ = [
    "ReconstructionMetrics",
    "dictionary_placement",
    "firing_mask",
    "reconstruction_metrics",
    "same_device",
]


class ReconstructionMetrics(Contract):
    """Whole-set reconstruction figures of one dictionary on one set of activations."""

    n_tokens: int = Field(description="Activation rows the figures were computed on.")
    fvu: float = Field(
        description="Fraction of variance unexplained: sum ||x - x_hat||^2 / sum ||x - mean||^2"
    )
    explained_variance: float = Field(description="1 - fvu.")
    mse: float = Field(description="Mean over tokens of ||x - x_hat||^2 / d_in.")
    l0: float = Field(description="Mean number of firing codes per token (`Dictionary.active`).")
    dead_fraction: float = Field(description="Share of latents that fired on no row.")
    fvu_batch_mean: float = Field(
        description="Older FVU: the mean over batches of each batch's own FVU (per-batch mean). Biased; "
        "kept only to compare with figures quoted that way."
    )
    cosine_similarity: float = Field(description="Mean over tokens of cos(x, x_hat); 0 where either is 0.")
    norm_ratio: float = Field(description="Mean over tokens of ||x_hat|| / ||x|| (tokens with x != 0).")
    dense_fraction: float = Field(description="Share of latents firing on > `dense_threshold` of rows.")
    dense_threshold: float = Field(description="Firing frequency above which a latent counts as dense.")
    freq_hist_edges: list[float] = Field(
        description="log10 firing-frequency bin edges; dead latents are counted apart, in `dead_fraction`."
    )
    freq_hist_counts: list[int] = Field(description="Latents (that fired at least once) per bin.")


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


def firing_mask(dictionary: nn.Module, codes: Tensor) -> Tensor:
    """Bool mask [..., d_sae] of the codes that fire: the dictionary's `active`, else `codes != 0`.

    Modules without `active` (plain encoder/decoder pairs) fall back to "nonzero".
    """
    active = getattr(dictionary, "active", None)
    if active is None:
        return codes != 0
    return active(codes)


def same_device(a: torch.device, b: torch.device) -> bool:
    """Whether two devices are the same, reading a missing index ('cuda' vs 'cuda:0') as a match."""
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


@torch.no_grad()
def reconstruction_metrics(
    dictionary: nn.Module,
    acts: Tensor,
    *,
    batch_size: int = 4096,
    device: torch.device | str = "cpu",
    dense_threshold: float = 0.1,
    hist_bins_per_decade: int = 2,
    targets: Tensor | None = None,
) -> ReconstructionMetrics:
    """FVU, explained variance, MSE, L0, dead fraction and the other figures above on `acts [n, d_in]`.

    For a transcoder, `targets [n, d_in]` are the target hookpoint's activations of the same tokens: the
    reconstruction decode(encode(acts)) is compared with them (FVU against the target's variance).

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
    if targets is not None and targets.shape != acts.shape:
        raise ValueError(
            f"targets {list(targets.shape)} must match acts {list(acts.shape)} row for row; load the "
            "transcoder's input and target hookpoints with the same rows"
        )
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
    cos_sum = torch.zeros((), dtype=torch.float64, device=dict_device)
    ratio_sum = torch.zeros((), dtype=torch.float64, device=dict_device)
    ratio_count = 0
    fires = torch.zeros(dictionary.d_sae, dtype=torch.float64, device=dict_device)
    batch_fvus: list[float] = []
    seen = 0
    for start in range(0, n, batch_size):
        x = acts[start : start + batch_size].to(dict_device)
        codes = dictionary.encode(x.to(dict_dtype))
        x_hat = dictionary.decode(codes)
        if targets is not None:  # a transcoder: every figure below compares with the target site
            x = targets[start : start + batch_size].to(dict_device)
        x64, x_hat64 = x.double(), x_hat.double()
        batch_err = (x64 - x_hat64).pow(2).sum()
        sq_err += batch_err

        b = x64.shape[0]
        batch_mean = x64.mean(dim=0)
        batch_var = (x64 - batch_mean).pow(2).sum()
        if b > 1 and batch_var.item() > 0:  # a one-row batch has no variance of its own
            batch_fvus.append((batch_err / batch_var).item())
        x_norm, x_hat_norm = x64.norm(dim=1), x_hat64.norm(dim=1)
        cos_sum += torch.nn.functional.cosine_similarity(x64, x_hat64, dim=1, eps=1e-12).sum()
        real = x_norm > 0
        ratio_sum += (x_hat_norm[real] / x_norm[real]).sum()
        ratio_count += int(real.sum().item())
        delta = batch_mean - mean
        sq_dev += (x64 - batch_mean).pow(2).sum() + delta.pow(2).sum() * (seen * b / (seen + b))
        mean += delta * (b / (seen + b))
        seen += b

        fired = firing_mask(dictionary, codes)
        active += fired.sum(dtype=torch.float64)
        fires += fired.sum(dim=0, dtype=torch.float64)

    if sq_dev.item() == 0.0:
        raise ValueError(
            f"the {n} activation rows are all identical, so their variance is 0 and FVU is undefined; "
            "evaluate on more (and different) held-out tokens"
        )
    fvu = (sq_err / sq_dev).item()
    freq = fires / n
    edges, counts = frequency_histogram(freq, n, hist_bins_per_decade)
    metrics = ReconstructionMetrics(
        n_tokens=n,
        fvu=fvu,
        explained_variance=1.0 - fvu,
        mse=(sq_err / (n * d_in)).item(),
        l0=(active / n).item(),
        dead_fraction=(freq == 0).double().mean().item(),
        fvu_batch_mean=sum(batch_fvus) / len(batch_fvus) if batch_fvus else fvu,
        cosine_similarity=(cos_sum / n).item(),
        norm_ratio=(ratio_sum / max(ratio_count, 1)).item(),
        dense_fraction=(freq > dense_threshold).double().mean().item(),
        dense_threshold=dense_threshold,
        freq_hist_edges=edges,
        freq_hist_counts=counts,
    )
    log.info(
        "reconstruction on %d tokens: fvu=%.4f l0=%.1f dead=%.3f", n, fvu, metrics.l0, metrics.dead_fraction
    )
    return metrics


def frequency_histogram(freq: Tensor, n_rows: int, bins_per_decade: int = 2) -> tuple[list[float], list[int]]:
    """Histogram of log10 firing frequencies `freq [d_sae]` of the latents that fired at all.

    The bins run from the rarest frequency the data can show (1 / n_rows) up to 1, `bins_per_decade` per
    power of ten, so histograms of dictionaries evaluated on the same number of tokens share their edges.
    """
    lo = math.floor(math.log10(1.0 / n_rows) * bins_per_decade) / bins_per_decade
    n_bins = max(1, round(-lo * bins_per_decade))
    edges = torch.linspace(lo, 0.0, n_bins + 1, dtype=torch.float64)
    alive = freq[freq > 0].double().cpu().log10()
    # Last bin is closed on the right, so frequency 1 (10^0) lands in it.
    idx = torch.bucketize(alive, edges[1:-1], right=True)
    counts = torch.bincount(idx, minlength=n_bins)
    return [round(e, 6) for e in edges.tolist()], [int(c) for c in counts.tolist()]
