"""Per-latent statistics streamed over activation batches with bounded memory.

`activation_statistics` reads the firing codes as sparse batches from a `CodeStream` (encoded once, then read
back from its spill), so memory is one batch plus small per-latent tables whatever the number of rows, and
the work grows with the number of firings, not rows x d_sae:
- histogram of the positive codes in `n_bins` equal bins over [0, max_activation] (max from the top-k pass);
- examples sampled from activation quantile bins: the histogram gives per-latent quantile edges, then
  priority sampling (each firing gets a seeded uniform key; the smallest keys in each bin are kept) draws
  `per_bin` firings uniformly from each bin;
- `n_random` silent rows per latent: uniform random candidate rows, the first ones where it does not fire;
- co-occurrence: Jaccard index of firing sets, counted from the pairs of firings on each row, in chunks of
  latents so that the count matrix stays below `cooc_budget` entries (one more pass per further chunk).
Every table lives on the device of the firing codes (the dictionary's): only the final per-latent tables
come back to the CPU. The seeded uniform keys and candidate rows are drawn on the CPU and moved, so the
result does not depend on the device.
`decoder_neighbours` and `logit_effects` only need weights.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from featureatlas.tasks.labeling.code_stream import (
    CodeStream,
    SparseBatch,
    kth_per_group,
    lookup,
    smallest_per_group,
)

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


def _histogram(b: SparseBatch, hist: Tensor, scale: Tensor, n_bins: int) -> None:
    """Add this batch's firings to `hist [d_sae, n_bins]` (equal bins over [0, max_activation])."""
    bins = (b.values * scale[b.latents]).long().clamp_(0, n_bins - 1).add_(b.latents * n_bins)
    hist.view(-1).add_(torch.bincount(bins, minlength=hist.numel()))  # a count, not a scatter of ones


# Multiply-adds a matrix product may spend per counted firing pair before counting the pairs (one `bincount`
# element each) is cheaper. On a GPU a dense [rows, n]^T @ [rows, d_sae] product of the 0/1 firing matrices
# (its matmul is cheap next to scattered atomics); on the CPU the chunk's firings as a sparse CSR matrix times
# the dense firing matrix (chunk firings x d_sae multiply-adds, a fraction of the dense product's).
DENSE_PAIR_COST = 4096
SPARSE_PAIR_COST = 64
BINCOUNT_DEVICES = ("cpu",)  # where counting the pairs with one bincount per block beats atomic adds


def _cooc_add(counts: Tensor, b: SparseBatch, lo: int, d_sae: int, max_pairs: int = 1 << 22) -> None:
    """Add to `counts [n, d_sae]` how often latent lo+i fires on the same row as each latent (itself too).

    Exact ways, the cheapest chosen per batch. Few latents (the product's multiply-adds within
    `DENSE_PAIR_COST` / `SPARSE_PAIR_COST` per firing pair): one product of the 0/1 firing matrices, exact in
    float32 since a batch has far fewer than 2^24 rows. Otherwise the firing pairs are counted: each row's
    chunk firings and all its firings laid out in padded [rows, k] tables, every (chunk latent, latent) pair
    of a row turned into one flat index, and the indices counted with one `bincount` per block of rows (about
    `max_pairs` pairs), so the cost is rows x (chunk firings per row) x (firings per row), never
    rows x n x d_sae."""
    n, dev = counts.shape[0], counts.device
    local = b.rows - b.start
    if len(local) == 0:
        return
    per_row = torch.bincount(local, minlength=b.n)
    whole = lo == 0 and n == d_sae  # one chunk holds every latent: nothing to select
    sel = None if whole else (b.latents >= lo) & (b.latents < lo + n)
    per_row_a = per_row if whole else torch.bincount(local[sel], minlength=b.n)
    n_sel, pairs = int(per_row_a.sum()), int((per_row_a * per_row).sum())
    if n_sel == 0:
        return
    if dev.type == "cpu" and n_sel * d_sae <= SPARSE_PAIR_COST * pairs:
        fired = torch.zeros(b.n, d_sae)
        fired[local, b.latents] = 1.0
        lat_a, local_a = (b.latents, local) if whole else (b.latents[sel] - lo, local[sel])
        order = torch.argsort(lat_a, stable=True)  # CSR rows: the chunk's latents
        crow = torch.zeros(n + 1, dtype=torch.int64)
        crow[1:] = torch.bincount(lat_a, minlength=n).cumsum(0)
        with warnings.catch_warnings():  # "sparse CSR support is in beta": the product used here is stable
            warnings.simplefilter("ignore", UserWarning)
            chunk_t = torch.sparse_csr_tensor(crow, local_a[order], torch.ones(n_sel), (n, b.n))
            counts += (chunk_t @ fired).to(counts.dtype)
        return
    if sel is None:
        sel = torch.ones_like(b.latents, dtype=torch.bool)
    if dev.type != "cpu" and b.n * n * d_sae <= DENSE_PAIR_COST * pairs:
        fired = torch.zeros(b.n, d_sae, device=dev)
        fired[local, b.latents] = 1.0
        counts += (fired[:, lo : lo + n].T @ fired).to(counts.dtype)
        return
    k, k_a = int(per_row.max()), int(per_row_a.max())
    # slot of each firing within its row's (all / chunk) firings; rows are sorted, so a cumulative count
    slot = torch.arange(len(local), device=dev) - (per_row.cumsum(0) - per_row)[local]
    every = torch.full((b.n, k), d_sae, dtype=torch.int64, device=dev)  # d_sae: an empty slot
    every[local, slot] = b.latents
    a_local = local[sel]
    slot_a = torch.arange(len(a_local), device=dev) - (per_row_a.cumsum(0) - per_row_a)[a_local]
    chunk = torch.full((b.n, k_a), n, dtype=torch.int64, device=dev)  # n: an empty slot
    chunk[a_local, slot_a] = b.latents[sel] - lo
    if dev.type not in BINCOUNT_DEVICES:
        # a GPU adds each real pair into the count matrix with atomics: no [n, d_sae]-sized temporary
        flat, step = counts.view(-1), max(1, max_pairs // (k * k_a))
        for r in range(0, b.n, step):
            a, e = chunk[r : r + step, :, None], every[r : r + step, None, :]
            idx = (a * d_sae + e)[(a < n) & (e < d_sae)]
            flat.index_add_(0, idx, torch.ones(len(idx), dtype=counts.dtype, device=dev))
        return
    width = (n + 1) * (d_sae + 1)
    if width < 1 << 31:  # int32 pair indices: half the memory traffic of the [rows, k_a, k] index block
        chunk, every = chunk.int(), every.int()
    # blocks of at least `width` pairs: each bincount's zeroed [width] output is paid for by as many pairs
    step = max(1, max(max_pairs, width) // (k * k_a))
    for r in range(0, b.n, step):
        idx = chunk[r : r + step, :, None] * (d_sae + 1) + every[r : r + step, None, :]
        found = torch.bincount(idx.view(-1), minlength=width).view(n + 1, d_sae + 1)
        counts += found[:n, :d_sae].to(counts.dtype)


def _top_per_row(scores: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """The n largest scores of each row and their columns, ties to the lower column, ordered by score then
    column: the same on every device (`torch.topk` leaves the order of ties to the kernel)."""
    if n == 0:
        return torch.empty(len(scores), 0, dtype=torch.int64, device=scores.device), scores[:, :0]
    threshold = torch.topk(scores, n, dim=1).values[:, -1:]
    above = scores > threshold
    tied = scores == threshold
    take = above | (tied & (tied.cumsum(1) <= n - above.sum(1, keepdim=True)))
    cols = take.nonzero(as_tuple=True)[1].view(len(scores), n)  # row-major: ascending columns
    vals = scores.gather(1, cols)
    order = torch.sort(vals, dim=1, descending=True, stable=True).indices
    return cols.gather(1, order), vals.gather(1, order)


def _quantile_edges(hist: Tensor, max_act: Tensor, n_q: int) -> Tensor:
    """[d_sae, n_q + 1] activation edges splitting each latent's firings into n_q equal-count bins."""
    n_bins, dev = hist.shape[1], hist.device
    cum = hist.double().cumsum(1) / hist.double().sum(1, keepdim=True).clamp_min(1)
    targets = torch.arange(1, n_q, dtype=torch.float64, device=dev) / n_q
    idx = torch.searchsorted(cum.contiguous(), targets.expand(hist.shape[0], -1).contiguous())
    inner = (idx + 1).double() / n_bins * max_act[:, None].double()
    zeros = torch.zeros(hist.shape[0], 1, dtype=torch.float64, device=dev)
    return torch.cat([zeros, inner, max_act[:, None].double() * (1 + 1e-6)], dim=1)


class _QuantileSampler:
    """Priority sampling per (latent, quantile bin): each firing gets a seeded uniform key, and the `per_bin`
    smallest keys of each bin are kept with their rows and codes, a uniform sample of the bin's firings."""

    def __init__(self, edges: Tensor, per_bin: int, gen: torch.Generator):
        self.inner = edges[:, 1:-1].float()  # a firing's bin: how many inner edges it reaches
        self.top = edges[:, -1].float()
        self.n_q, self.per_bin, self.gen = edges.shape[1] - 1, per_bin, gen
        dev = self.dev = edges.device
        self.group = torch.empty(0, dtype=torch.int64, device=dev)
        self.key, self.val = torch.empty(0, device=dev), torch.empty(0, device=dev)
        self.row = torch.empty(0, dtype=torch.int64, device=dev)
        self.ceiling = torch.full((edges.shape[0] * self.n_q,), 2.0, device=dev)  # keys < 1: 2 admits any

    def add(self, b: SparseBatch) -> None:
        key = torch.rand(len(b.values), generator=self.gen).to(self.dev)
        q = (b.values[:, None] >= self.inner[b.latents]).sum(1)
        group = b.latents * self.n_q + q
        # only keys below their full bin's per_bin-th smallest key can enter it
        ok = (b.values < self.top[b.latents]) & (key < self.ceiling[group])
        group = torch.cat([self.group, group[ok]])
        key, val = torch.cat([self.key, key[ok]]), torch.cat([self.val, b.values[ok]])
        row = torch.cat([self.row, b.rows[ok]])
        keep = smallest_per_group(group, key, self.per_bin)
        self.group, self.key, self.val, self.row = group[keep], key[keep], val[keep], row[keep]
        self.ceiling = kth_per_group(self.group, self.key, self.per_bin, len(self.ceiling), empty=2.0)

    def result(self, d_sae: int) -> tuple[Tensor, Tensor]:
        rows = torch.full((d_sae * self.n_q, self.per_bin), -1, dtype=torch.int64, device=self.dev)
        vals = torch.full(rows.shape, float("nan"), dtype=torch.float64, device=self.dev)
        slot = torch.arange(len(self.group), device=self.dev) - torch.searchsorted(self.group, self.group)
        rows[self.group, slot], vals[self.group, slot] = self.row, self.val.double()
        shape = (d_sae, self.n_q, self.per_bin)
        return rows.view(shape), vals.view(shape)


def _silent_candidates(d_sae: int, n_rows: int, n_random: int, gen: torch.Generator) -> Tensor:
    """[d_sae, 4 * n_random] uniform random rows per latent, repeats replaced by -1 (first one kept)."""
    cand = torch.randint(0, n_rows, (d_sae, 4 * n_random), generator=gen)
    srt, order = torch.sort(cand, dim=1, stable=True)
    dup = torch.zeros_like(srt, dtype=torch.bool)
    dup[:, 1:] = srt[:, 1:] == srt[:, :-1]
    return cand.masked_fill(torch.zeros_like(dup).scatter(1, order, dup), -1)


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
    cooc_budget: int | None = None,
    seed: int = 0,
    codes: CodeStream | None = None,
) -> ActivationStats:
    """Stream `batches()` (or the shared `codes`); `max_activation [d_sae]` comes from the top-k pass.

    `cooc_budget`: entries of one co-occurrence count chunk (default 2^24 on the CPU, 2^28 on a GPU)."""
    own = codes is None
    if codes is None:
        codes = CodeStream(dictionary, batches)
    try:
        return _statistics(
            codes, max_activation, n_bins, n_quantiles, per_bin, n_random, n_cooc, cooc_budget, seed
        )
    finally:
        if own:
            codes.close()


def _statistics(codes, max_activation, n_bins, n_quantiles, per_bin, n_random, n_cooc, cooc_budget, seed):
    d_sae = codes.d_sae
    counts = {}  # co-occurrence count chunks, each [chunk, d_sae]; two ride along the first passes

    def take_top(lo: int, c: Tensor) -> None:
        c = c.double()
        union = fired_n[lo : lo + c.shape[0], None] + fired_n[None, :] - c
        jac = c / union.clamp_min(1)
        at = torch.arange(c.shape[0], device=dev)
        jac[at, at + lo] = -1  # not itself
        idx, vals = _top_per_row(jac, cooc_lat.shape[1])
        cooc_lat[lo : lo + c.shape[0]], cooc_jac[lo : lo + c.shape[0]] = idx, vals

    # Pass 1: histograms, firing counts, the first co-occurrence chunk. Tables go where the codes are.
    dev = hist = None
    n_rows = 0
    for b in codes:
        if dev is None:
            dev = b.latents.device
            if cooc_budget is None:  # a GPU holds a larger count matrix: fewer passes over the codes
                cooc_budget = 1 << (28 if dev.type == "cuda" else 24)
            chunk = max(1, min(d_sae, cooc_budget // max(d_sae, 1)))
            max_act = max_activation.to(dev, torch.float64).clamp_min(0)
            scale = (n_bins / max_act.clamp_min(1e-12)).float()
            hist = torch.zeros(d_sae, n_bins, dtype=torch.int64, device=dev)
            fired_n = torch.zeros(d_sae, dtype=torch.int64, device=dev)
            # exact integer counts: int32 holds up to 2^31 rows, and halves the matrix next to int64
            counts[0] = torch.zeros(min(chunk, d_sae), d_sae, dtype=torch.int32, device=dev)
        _histogram(b, hist, scale, n_bins)
        fired_n += torch.bincount(b.latents, minlength=d_sae)
        _cooc_add(counts[0], b, 0, d_sae)
        n_rows = b.start + b.n
    if dev is None:
        raise ValueError("the activation stream yielded no rows; label on at least one activation row")
    hist, fired_n = hist.double(), fired_n.double()
    chunks = list(range(0, d_sae, chunk))
    cooc_lat = torch.empty(d_sae, min(n_cooc, d_sae - 1), dtype=torch.int64, device=dev)
    cooc_jac = torch.empty(cooc_lat.shape, dtype=torch.float64, device=dev)
    take_top(0, counts.pop(0))

    # Pass 2: quantile samples, the silent check of random candidate rows, the second co-occurrence chunk.
    gen = torch.Generator().manual_seed(seed)  # on the CPU: the same draws whatever the device
    edges = _quantile_edges(hist, max_act, n_quantiles)
    sampler = _QuantileSampler(edges, per_bin, gen)
    cand = _silent_candidates(d_sae, max(n_rows, 1), n_random, gen).to(dev)
    flat_c = cand.flatten()
    order = torch.argsort(flat_c)
    lat_of = torch.arange(d_sae, device=dev).repeat_interleave(cand.shape[1])
    cand_rows, cand_lat = flat_c[order], lat_of[order]
    fires = torch.zeros(len(flat_c), dtype=torch.bool, device=dev)
    second = chunks[1] if len(chunks) > 1 else None
    if second is not None:
        counts[second] = torch.zeros(min(chunk, d_sae - second), d_sae, dtype=torch.int32, device=dev)
    for b in codes:
        sampler.add(b)
        bounds = torch.tensor([b.start, b.start + b.n], device=dev)
        lo, hi = torch.searchsorted(cand_rows, bounds).tolist()
        if lo < hi:
            fires[order[lo:hi]] = lookup(b, d_sae, cand_rows[lo:hi], cand_lat[lo:hi]) > 0
        if second is not None:
            _cooc_add(counts[second], b, second, d_sae)
    if second is not None:
        take_top(second, counts.pop(second))
    sample_rows, sample_vals = sampler.result(d_sae)
    silent = cand.masked_fill(fires.view(cand.shape), -1)
    # the first n_random silent candidates of each latent, in candidate order
    rank = (silent >= 0).long().cumsum(1)
    keep = (silent >= 0) & (rank <= n_random)
    random_rows = torch.full((d_sae, n_random), -1, dtype=torch.int64, device=dev)
    lat_i, col = keep.nonzero(as_tuple=True)
    random_rows[lat_i, rank[lat_i, col] - 1] = silent[lat_i, col]

    # Further passes: the remaining co-occurrence chunks (over the spilled firing codes, no re-encoding).
    for lo in chunks[2:]:
        c = torch.zeros(min(chunk, d_sae - lo), d_sae, dtype=torch.int32, device=dev)
        for b in codes:
            _cooc_add(c, b, lo, d_sae)
        take_top(lo, c)
    out = (hist, edges, sample_rows, sample_vals, random_rows, cooc_lat, cooc_jac)
    return ActivationStats(*(t.cpu() for t in out))  # only the small per-latent tables leave the device


@torch.no_grad()
def decoder_neighbours(W_dec: Tensor, n: int = 5, chunk: int = 1024) -> tuple[Tensor, Tensor]:
    """Nearest latents by cosine of decoder rows `W_dec [d_sae, d_in]`: indices and cosines [d_sae, n]."""
    d_sae = W_dec.shape[0]
    unit = torch.nn.functional.normalize(W_dec.float(), dim=1)
    n = min(n, d_sae - 1)
    idx = torch.empty(d_sae, n, dtype=torch.int64, device=W_dec.device)
    cos = torch.empty(d_sae, n, device=W_dec.device)
    for lo in range(0, d_sae, chunk):
        sim = unit[lo : lo + chunk] @ unit.T
        at = torch.arange(sim.shape[0], device=sim.device)
        sim[at, at + lo] = -2  # not itself
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
    W_U = W_U.to(W_dec.device)  # on the dictionary's device: a [chunk, d_in] x [d_in, vocab] matmul per chunk
    norm_weight = None if norm_weight is None else norm_weight.to(W_dec.device)
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
    up_i, up_v, dn_i, dn_v = (torch.cat(o).cpu() for o in outs)
    return up_i, up_v, dn_i, dn_v
