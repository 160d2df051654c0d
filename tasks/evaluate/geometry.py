"""Geometry of a dictionary's decoder directions: how much latents overlap each other and the neuron basis.

With unit decoder directions d_j (rows of W_dec, found through `decode` so every method qualifies):
  coherence        - max over pairs i != j of |<d_i, d_j>| (mutual coherence; 1 if two latents are parallel
                     or antiparallel);
  mean_max_cosine  - mean over latents of max_{i != j} |<d_i, d_j>|: how close, on average, each latent's
                     nearest neighbour is;
  duplicate_fraction - share of latents with a neighbour at |cos| > `duplicate_threshold` (near-copies);
  neuron_alignment - mean over latents of max_k |d_j[k]|: 1 when every latent is a single neuron (the
                     "dictionary" is the neuron basis), about sqrt(2 log d_in / d_in) for random directions.
Latents that decode to zero are left out (they write nothing and have no direction).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from schemas.evaluation import DecoderGeometry
from tasks.evaluate.metrics import dictionary_placement

__all__ = ["DecoderGeometry", "decoder_directions", "decoder_geometry"]


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


@torch.no_grad()
def decoder_geometry(
    dictionary: nn.Module, *, duplicate_threshold: float = 0.9, chunk: int = 1024
) -> DecoderGeometry:
    """Coherence, nearest-neighbour cosine, duplicates and neuron alignment of the decoder directions."""
    W_dec = decoder_directions(dictionary, chunk)
    norms = W_dec.norm(dim=1)
    D = W_dec[norms > 0] / norms[norms > 0, None]  # [n, d_in], unit rows
    n = D.shape[0]
    if n < 2:
        raise ValueError(f"the dictionary has {n} nonzero decoder direction(s); geometry needs at least two")
    nearest = torch.empty(n, device=D.device)
    # The full n x n Gram matrix of a 65k-latent dictionary is 16 GiB: take it a block of rows at a time.
    for start in range(0, n, chunk):
        block = (D[start : start + chunk] @ D.T).abs()
        rows = torch.arange(block.shape[0], device=D.device)
        block[rows, rows + start] = 0.0  # a latent is not its own neighbour
        nearest[start : start + chunk] = block.max(dim=1).values
    return DecoderGeometry(
        n_directions=n,
        coherence=nearest.max().item(),
        mean_max_cosine=nearest.mean().item(),
        duplicate_fraction=(nearest > duplicate_threshold).float().mean().item(),
        duplicate_threshold=duplicate_threshold,
        neuron_alignment=D.abs().max(dim=1).values.mean().item(),
    )
