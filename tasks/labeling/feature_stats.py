"""Per-latent statistics streamed over activation batches with bounded memory.

`activation_statistics` makes a fixed number of passes over `batches()` (a factory yielding activation rows in
order, e.g. one cache shard at a time), so memory is [batch, d_sae] plus small per-latent tables whatever the
number of rows:
- histogram of the positive codes in `n_bins` equal bins over [0, max_activation] (max from the top-k pass);
- examples sampled from activation quantile bins: the histogram gives per-latent quantile edges, then
  priority sampling (each (row, latent) gets a seeded uniform key; the smallest keys in each bin are
  kept) draws `per_bin` rows uniformly from each bin, plus `n_random` rows where the latent is silent;
- co-occurrence: Jaccard index of firing sets, counted in chunks of latents so that the count matrix stays
  below `cooc_budget` entries (a dictionary larger than that costs one extra pass per chunk).
`decoder_neighbours` and `logit_effects` only need weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tasks.labeling.codes import firing_codes

__all__ = ["ActivationStats", "activation_statistics", "decoder_neighbours", "logit_effects"]

Batches = Callable[[], Iterable[Tensor]]


@dataclass
class ActivationStats:
    """hist [d_sae, n_bins] counts; sample_rows/sample_vals [d_sae, n_q, per_bin] (-1 / nan when empty);
    random_rows [d_sae, n_random] silent rows (-1 when empty); cooc_latents/cooc_jaccard [d_sae, n_cooc]."""

    hist: Tensor
    quantile_edges: Tensor
    sample_rows: Tensor
    sample_vals: Tensor
    random_rows: Tensor
    cooc_latents: Tensor
    cooc_jaccard: Tensor


def _keep_smallest(
    best_k: Tensor, best_r: Tensor, keys: Tensor, rows: Tensor, n: int
) -> tuple[Tensor, Tensor]:
    """Merge running [d_sae, n] smallest keys with a batch's keys [B, d_sae] (inf = not eligible)."""
    k = min(n, keys.shape[0])
    vals, idx = torch.topk(keys, k, dim=0, largest=False)
    merged_k = torch.cat([best_k, vals.T], dim=1)
    merged_r = torch.cat([best_r, rows[idx].T], dim=1)
    best_k, order = torch.topk(merged_k, min(n, merged_k.shape[1]), dim=1, largest=False)
    return best_k, torch.gather(merged_r, 1, order)


@torch.no_grad()
def _codes(dictionary: nn.Module, batches: Batches):
    start = 0
    for acts in batches():
        codes = firing_codes(dictionary, acts)
        rows = torch.arange(start, start + codes.shape[0], dtype=torch.int64)
        start += codes.shape[0]
        yield rows, codes


def _histogram(dictionary, batches, max_act: Tensor, n_bins: int, chunk: int):
    """Pass 1: histograms, firing counts, and the co-occurrence counts of the first `chunk` latents."""
    d_sae = max_act.shape[0]
    hist = torch.zeros(d_sae, n_bins, dtype=torch.float64)
    fired_n = torch.zeros(d_sae, dtype=torch.float64)
    cooc = torch.zeros(min(chunk, d_sae), d_sae, dtype=torch.float64)
    scale = (n_bins / max_act.clamp_min(1e-12)).float()
    offsets = torch.arange(d_sae) * n_bins
    for _, codes in _codes(dictionary, batches):
        fired = codes > 0
        bins = (codes * scale).long().clamp(0, n_bins - 1) + offsets
        hist.view(-1).index_add_(0, bins[fired], torch.ones(int(fired.sum()), dtype=torch.float64))
        f = fired.float()  # per-batch counts are exact in float32; totals accumulate in float64
        fired_n += f.sum(0)
        cooc += _cooc_counts(f, 0, cooc.shape[0])
    return hist, fired_n, cooc


def _cooc_counts(f: Tensor, lo: int, n: int) -> Tensor:
    """[n, d_sae] joint firing counts of latents lo..lo+n with all latents in the batch `f [B, d_sae]`.

    Sparse times dense: codes are sparse, so this costs nnz * d_sae instead of B * n * d_sae."""
    return torch.sparse.mm(f[:, lo : lo + n].T.to_sparse(), f)


def _quantile_edges(hist: Tensor, max_act: Tensor, n_q: int) -> Tensor:
    """[d_sae, n_q + 1] activation edges splitting each latent's firings into n_q equal-count bins."""
    n_bins = hist.shape[1]
    cum = hist.cumsum(1) / hist.sum(1, keepdim=True).clamp_min(1)
    targets = torch.arange(1, n_q, dtype=torch.float64) / n_q
    idx = torch.searchsorted(cum.contiguous(), targets.expand(hist.shape[0], -1).contiguous())
    inner = (idx + 1).double() / n_bins * max_act[:, None].double()
    zeros = torch.zeros(hist.shape[0], 1, dtype=torch.float64)
    return torch.cat([zeros, inner, max_act[:, None].double() * (1 + 1e-6)], dim=1)


def activation_statistics(
    dictionary: nn.Module,
    batches: Batches,
    max_activation: Tensor,
    *,
    n_bins: int = 20,
    n_quantiles: int = 4,
    per_bin: int = 3,
    n_random: int = 10,
    n_cooc: int = 5,
    cooc_budget: int = 1 << 24,
    seed: int = 0,
) -> ActivationStats:
    """Stream `batches()` two or more times; `max_activation [d_sae]` comes from the top-k pass."""
    d_sae = dictionary.d_sae
    max_act = max_activation.double().clamp_min(0)
    chunk = max(1, min(d_sae, cooc_budget // max(d_sae, 1)))
    hist, fired_n, cooc = _histogram(dictionary, batches, max_act, n_bins, chunk)
    edges = _quantile_edges(hist, max_act, n_quantiles)

    edges_f = edges.float()
    inf = torch.empty(d_sae, 0)
    none = torch.empty(d_sae, 0, dtype=torch.int64)
    best = [(inf, none) for _ in range(n_quantiles)]
    silent = (inf, none)
    gen = torch.Generator().manual_seed(seed)
    for rows, codes in _codes(dictionary, batches):
        # float32 keys and codes: a batch's [B, d_sae] temporaries dominate memory at large d_sae
        keys = torch.rand(codes.shape, generator=gen)
        c = codes
        for q in range(n_quantiles):
            inside = (c > 0) & (c >= edges_f[:, q]) & (c < edges_f[:, q + 1])
            best[q] = _keep_smallest(*best[q], keys.masked_fill(~inside, float("inf")), rows, per_bin)
        silent = _keep_smallest(*silent, keys.masked_fill(c > 0, float("inf")), rows, n_random)
    sample_rows = torch.full((d_sae, n_quantiles, per_bin), -1, dtype=torch.int64)
    for q, (k, r) in enumerate(best):
        sample_rows[:, q, : r.shape[1]] = r.masked_fill(k.isinf(), -1)
    random_rows = torch.full((d_sae, n_random), -1, dtype=torch.int64)
    random_rows[:, : silent[1].shape[1]] = silent[1].masked_fill(silent[0].isinf(), -1)

    # The codes of the sampled rows, and the remaining co-occurrence chunks, come from further passes.
    sample_vals = torch.full(sample_rows.shape, float("nan"), dtype=torch.float64)
    flat_rows = sample_rows.reshape(d_sae, -1)
    cooc_lat = torch.empty(d_sae, min(n_cooc, d_sae - 1), dtype=torch.int64)
    cooc_jac = torch.empty(cooc_lat.shape, dtype=torch.float64)

    def take_top(lo: int, counts: Tensor) -> None:
        union = fired_n[lo : lo + counts.shape[0], None] + fired_n[None, :] - counts
        jac = counts / union.clamp_min(1)
        jac[torch.arange(counts.shape[0]), torch.arange(lo, lo + counts.shape[0])] = -1  # not itself
        vals, idx = torch.topk(jac, cooc_lat.shape[1], dim=1)
        cooc_lat[lo : lo + counts.shape[0]], cooc_jac[lo : lo + counts.shape[0]] = idx, vals

    take_top(0, cooc)
    for lo in range(0, d_sae, chunk):
        counts = torch.zeros(min(chunk, d_sae - lo), d_sae, dtype=torch.float64) if lo else None
        for rows, codes in _codes(dictionary, batches):
            if lo == 0:
                _fill_sample_vals(sample_vals, flat_rows, rows, codes)
            else:
                counts += _cooc_counts((codes > 0).float(), lo, counts.shape[0])
        if lo:
            take_top(lo, counts)
    return ActivationStats(hist, edges, sample_rows, sample_vals, random_rows, cooc_lat, cooc_jac)


def _fill_sample_vals(out: Tensor, flat_rows: Tensor, rows: Tensor, codes: Tensor) -> None:
    """Write the codes of sampled rows that fall in this batch into `out [d_sae, n_q, per_bin]`."""
    start, stop = int(rows[0]), int(rows[-1]) + 1
    in_batch = (flat_rows >= start) & (flat_rows < stop)
    lat, slot = in_batch.nonzero(as_tuple=True)
    vals = codes[flat_rows[lat, slot] - start, lat].double()
    out.view(out.shape[0], -1)[lat, slot] = vals


@torch.no_grad()
def decoder_neighbours(W_dec: Tensor, n: int = 5, chunk: int = 1024) -> tuple[Tensor, Tensor]:
    """Nearest latents by cosine of decoder rows `W_dec [d_sae, d_in]`: indices and cosines [d_sae, n]."""
    d_sae = W_dec.shape[0]
    unit = torch.nn.functional.normalize(W_dec.float(), dim=1)
    n = min(n, d_sae - 1)
    idx = torch.empty(d_sae, n, dtype=torch.int64)
    cos = torch.empty(d_sae, n)
    for lo in range(0, d_sae, chunk):
        sim = unit[lo : lo + chunk] @ unit.T
        sim[torch.arange(sim.shape[0]), torch.arange(lo, lo + sim.shape[0])] = -2  # not itself
        cos[lo : lo + chunk], idx[lo : lo + chunk] = torch.topk(sim, n, dim=1)
    return idx, cos


@torch.no_grad()
def logit_effects(
    W_dec: Tensor,
    W_U: Tensor,
    norm_weight: Tensor | None = None,
    *,
    center: bool = False,
    k: int = 10,
    chunk: int = 1024,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Direct effect of each decoder row on the logits: (W_dec [* norm_weight]) @ W_U.T, `W_U [vocab, d_in]`.

    The final norm's scale is a positive scalar per token, so only its elementwise weight (and, for
    LayerNorm, `center`: removing the mean) changes which tokens a direction promotes. Returns the top-k
    promoted token ids and logits and the top-k suppressed ones, each [d_sae, k].
    """
    k = min(k, W_U.shape[0])
    outs = [[], [], [], []]
    for lo in range(0, W_dec.shape[0], chunk):
        d = W_dec[lo : lo + chunk].float()
        if center:
            d = d - d.mean(1, keepdim=True)
        if norm_weight is not None:
            d = d * norm_weight.float()
        logits = d @ W_U.float().T
        up_v, up_i = torch.topk(logits, k, dim=1)
        dn_v, dn_i = torch.topk(logits, k, dim=1, largest=False)
        for o, t in zip(outs, (up_i, up_v, dn_i, dn_v)):
            o.append(t)
    up_i, up_v, dn_i, dn_v = (torch.cat(o) for o in outs)
    return up_i, up_v, dn_i, dn_v
