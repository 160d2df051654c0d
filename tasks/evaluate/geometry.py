"""Geometry of a dictionary's decoder directions: how much latents overlap, under the atomic inner product.

The atomic inner product ("Towards Atoms of LLMs") measures directions the way the model's activations do:
with `S = (E[x x^T] + lambda I)^-1` estimated from the cache, a direction d is whitened to `S^(1/2) d`, so
two latents whose directions differ only along high-variance axes of the activations count as close. On the
unit whitened directions u_i:
  mu_i             - coherence of latent i, max_{j != i} |<u_i, u_j>|;
  unique_fraction  - share of latents with mu_i < 1/(2K - 1), K the dictionary's L0: the condition under which
                     a K-sparse code over these directions is the unique sparsest one (Donoho-Elad);
and the same for the neuron basis (whitened e_k) as a baseline, at the dictionary's K and at the neuron
basis's own L0 (the mean number of nonzero coordinates of x). lambda is `ridge * tr(E[x x^T]) / d_in`, so
the ridge means the same at every hookpoint scale.

`decoder_geometry` keeps the earlier, plain Euclidean figures (nearest-neighbour |cos| of the unwhitened unit
directions, duplicates, neuron alignment); they are labeled `euclidean` in the report and are not the
atomic inner product. Latents that decode to zero are left out of both (they write nothing).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from featureatlas.schemas.evaluation import AtomicGeometry, DecoderGeometry
from featureatlas.tasks.evaluate.metrics import dictionary_placement

__all__ = [
    "AtomicGeometry",
    "DecoderGeometry",
    "atomic_geometry",
    "coherences",
    "decoder_directions",
    "decoder_geometry",
    "whitening",
]


@torch.no_grad()
def decoder_directions(dictionary: nn.Module, chunk: int = 1024) -> Tensor:
    """Decoder rows `[d_sae, d_in]` as decode(e_j) - decode(0), in float32, a chunk of latents at a time."""
    device, dtype = dictionary_placement(dictionary, "cpu", torch.float32)
    zero = dictionary.decode(torch.zeros(1, dictionary.d_sae, device=device, dtype=dtype))
    rows = []
    for start in range(0, dictionary.d_sae, chunk):
        stop = min(start + chunk, dictionary.d_sae)
        codes = torch.zeros(stop - start, dictionary.d_sae, device=device, dtype=dtype)
        codes[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
        rows.append((dictionary.decode(codes) - zero).float())
    return torch.cat(rows)


def _unit_rows(D: Tensor) -> Tensor:
    norms = D.norm(dim=1)
    D = D[norms > 0] / norms[norms > 0, None]
    if D.shape[0] < 2:
        raise ValueError(f"the dictionary has {D.shape[0]} nonzero decoder direction(s); geometry needs two")
    return D


def coherences(U: Tensor, chunk: int = 1024) -> Tensor:
    """mu_i = max_{j != i} |<u_i, u_j>| for unit rows `U [n, d]`, in U's dtype."""
    n = U.shape[0]
    nearest = torch.empty(n, device=U.device, dtype=U.dtype)
    # The full n x n Gram matrix of a 65k-latent dictionary is 16 GiB: take it a block of rows at a time.
    for start in range(0, n, chunk):
        block = (U[start : start + chunk] @ U.T).abs()
        rows = torch.arange(block.shape[0], device=U.device)
        block[rows, rows + start] = 0.0  # a latent is not its own neighbour
        nearest[start : start + chunk] = block.max(dim=1).values
    return nearest


@torch.no_grad()
def decoder_geometry(
    dictionary: nn.Module, *, duplicate_threshold: float = 0.9, chunk: int = 1024
) -> DecoderGeometry:
    """Euclidean (unwhitened) coherence, nearest-neighbour cosine, duplicates and neuron alignment."""
    D = _unit_rows(decoder_directions(dictionary, chunk))
    nearest = coherences(D, chunk)
    return DecoderGeometry(
        n_directions=D.shape[0],
        coherence=nearest.max().item(),
        mean_max_cosine=nearest.mean().item(),
        duplicate_fraction=(nearest > duplicate_threshold).float().mean().item(),
        duplicate_threshold=duplicate_threshold,
        neuron_alignment=D.abs().max(dim=1).values.mean().item(),
    )


@torch.no_grad()
def whitening(acts: Tensor, ridge: float, chunk: int = 8192) -> tuple[Tensor, float]:
    """(S^(1/2) [d_in, d_in] in float64, lambda): S = (E[x x^T] + lambda I)^-1, lambda = ridge tr(E[xx^T])/d.

    Double precision: the small eigenvalues, which whitening blows up, are the ones float32 loses.
    """
    if acts.ndim != 2 or acts.shape[0] == 0:
        raise ValueError(f"activations must be [n_tokens > 0, d_in], got {list(acts.shape)}")
    d_in = acts.shape[1]
    second = torch.zeros(d_in, d_in, dtype=torch.float64, device=acts.device)
    for start in range(0, acts.shape[0], chunk):
        x = acts[start : start + chunk].double()
        second += x.T @ x
    second /= acts.shape[0]
    lam = ridge * second.trace().item() / d_in
    eigvals, eigvecs = torch.linalg.eigh(second)
    shifted = eigvals.clamp(min=0) + lam
    if shifted.min() <= 1e-12 * max(shifted.max().item(), 1e-300):
        raise ValueError(
            "E[x x^T] of the held-out activations is singular (some direction never varies), so the atomic "
            "inner product is undefined at ridge 0; set `evaluate.geometry_ridge` above 0 (e.g. 1e-3)"
        )
    return (eigvecs * shifted.rsqrt()) @ eigvecs.T, lam


def _unique_fraction(mu: Tensor, k: float) -> float:
    # For K <= 1 the bound 1/(2K - 1) is >= 1 (or undefined): every direction but an exact duplicate passes.
    bound = 1.0 / (2.0 * k - 1.0) if k > 1 else 1.0
    return (mu < bound).double().mean().item()


@torch.no_grad()
def atomic_geometry(
    dictionary: nn.Module, acts: Tensor, l0: float, *, ridge: float = 1e-3, chunk: int = 1024
) -> AtomicGeometry:
    """Coherence of the whitened decoder directions and the uniqueness fraction at K = `l0`, against the
    neuron basis; `acts [n_tokens, d_in]` are held-out activations at the dictionary's hookpoint."""
    if acts.shape[-1] != dictionary.d_in:
        raise ValueError(
            f"activations have width {acts.shape[-1]} but the dictionary's d_in is {dictionary.d_in}; "
            "take them from the dictionary's own hookpoint"
        )
    S_half, lam = whitening(acts, ridge)
    W_dec = decoder_directions(dictionary, chunk).to(S_half.device)
    live = W_dec.norm(dim=1) > 0
    # rows: (S^(1/2) d_j)^T = d_j^T S^(1/2), S^(1/2) being symmetric
    mu = coherences(_unit_rows(W_dec[live].double() @ S_half), chunk)
    mu_neuron = coherences(_unit_rows(S_half.clone()), chunk)
    neuron_l0 = (acts != 0).double().sum(1).mean().item()
    return AtomicGeometry(
        ridge=ridge,
        lambda_value=lam,
        n_directions=mu.numel(),
        k=l0,
        bound=1.0 / (2.0 * l0 - 1.0) if l0 > 1 else 1.0,
        max_coherence=mu.max().item(),
        mean_coherence=mu.mean().item(),
        unique_fraction=_unique_fraction(mu, l0),
        neuron_max_coherence=mu_neuron.max().item(),
        neuron_mean_coherence=mu_neuron.mean().item(),
        neuron_unique_fraction=_unique_fraction(mu_neuron, l0),
        neuron_l0=neuron_l0,
        neuron_unique_fraction_own_l0=_unique_fraction(mu_neuron, neuron_l0),
    )
