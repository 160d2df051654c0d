"""BatchTopK SAE (Bussmann et al. 2024): in training, keep the top k*batch pre-activations across the whole
batch, so tokens share a budget of k codes on average; at inference, keep codes above one learned threshold.

The threshold is a moving average of the smallest code the batch top-k kept (dictionary_learning
`trainers/batch_top_k.py`), stored as a buffer so it is saved in weights.safetensors with the parameters.
Everything else (AuxK, unit-norm decoder, input scaling) is the TopK SAE's.

A plain EMA with decay 0.999 from the first batch remembers the random initialisation, whose kept codes are
far larger than the trained model's: on a planted toy with k = 6 the held-out L0 at the inference threshold
was 0.4 after 300 steps, 3.1 after 1000 and 5.6 after 4000. The decay therefore grows with the updates seen,
beta_t = min(threshold_beta, (1 + t) / (50 + t)) (the form of TensorFlow's ExponentialMovingAverage with
num_updates): after t updates the average spans roughly the last t / 50 batches, so it follows the model
while it moves and reaches the configured decay only after ~50k steps. On that toy the held-out L0 is then
5.9 after 200 and 300 steps and 6.2 after 1000 (with (1 + t) / (10 + t), 5.2 after 300: a window of t / 10
still lags the shrinking codes). t is the optimizer-step counter, which checkpoints save, so a resumed run
continues the same schedule.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor

from featureatlas.schemas.methods import BatchTopKConfig
from featureatlas.tasks.dictionary.registry import register
from featureatlas.tasks.dictionary.sparse_decoder import flat_entries
from featureatlas.tasks.dictionary.topk import TopKSAE


def batch_topk(pre: Tensor, k: int) -> Tensor:
    """Codes [..., d_sae]: the k * n_tokens largest positive entries of pre over all tokens, others zero."""
    flat = pre.reshape(-1, pre.shape[-1])
    keep = min(k * flat.shape[0], flat.numel())
    top = flat.flatten().topk(keep, sorted=False)
    codes = torch.zeros_like(flat).flatten().scatter(-1, top.indices, top.values.relu())
    return codes.reshape(pre.shape)


def batch_topk_entries(pre: Tensor, k: int, oversample: int = 2) -> tuple[Tensor, Tensor]:
    """(rows, cols), sorted by row, of the k * n_tokens largest entries of pre [n_tokens, d_sae].

    First tried: a cut-off from a sample (`_above_sampled_cutoff`), one comparison pass instead of a top-k
    per token; if too few entries pass it, the per-token candidates below.
    """
    found = _above_sampled_cutoff(pre, k)
    if found is not None:
        return found
    return _batch_topk_by_candidates(pre, k, oversample)


def _above_sampled_cutoff(
    pre: Tensor, k: int, sample: int = 1 << 16, margin: float = 1.3
) -> tuple[Tensor, Tensor] | None:
    """The batch top-k among the entries at or above a cut-off estimated from an evenly strided sample.

    The cut-off is the sample's value that `margin` times the kept share of entries reach. Every entry the
    batch top-k keeps is at or above the keep-th largest value; when at least `keep` entries pass the
    cut-off, that value passes it too, so the top-k of the passing entries is exact. Otherwise None (the
    sample misjudged the tail): the caller falls back to per-token candidates.
    """
    n, d_sae = pre.shape
    flat = pre.reshape(-1)
    keep = min(k * n, flat.numel())
    if keep * margin >= flat.numel() or flat.numel() < 4 * sample:
        return None  # most entries are kept, or the batch is small: candidates are as cheap
    drawn = flat[:: flat.numel() // sample]
    n_drawn = math.ceil(keep / flat.numel() * drawn.numel() * margin)
    cutoff = drawn.topk(n_drawn, sorted=False).values.min()
    passing = (flat >= cutoff).nonzero().squeeze(1)
    if passing.numel() < keep:
        return None
    chosen = passing[flat[passing].topk(keep, sorted=False).indices].sort().values  # flat order: by row
    return chosen // d_sae, chosen % d_sae


def _batch_topk_by_candidates(pre: Tensor, k: int, oversample: int) -> tuple[Tensor, Tensor]:
    """`batch_topk_entries` from each token's top `oversample * k` candidates.

    A top-k over all n_tokens * d_sae entries is slow on CPU (seconds at the benchmark's size), so the
    candidates are first each token's top `oversample * k`. A token whose smallest candidate still reaches
    the batch's kept minimum might hold more beyond its candidates: all its entries then join the pool
    and the top-k runs again. That is exact: every other token's unseen entries lie below its smallest
    candidate, hence below the old kept minimum, which a larger pool can only raise.
    """
    n, d_sae = pre.shape
    keep = min(k * n, pre.numel())
    m = oversample * k
    if m >= d_sae:
        return flat_entries(pre.flatten().topk(keep, sorted=False).indices, d_sae)
    cand = pre.topk(m, dim=-1, sorted=False)
    top = cand.values.flatten().topk(keep, sorted=False)
    hot = cand.values.min(dim=-1).values >= top.values.min()
    if not bool(hot.any()):
        rows, cols = top.indices // m, cand.indices.flatten()[top.indices]
    else:
        cold, hot_rows = (~hot).nonzero().squeeze(1), hot.nonzero().squeeze(1)
        pool = torch.cat([cand.values[cold].flatten(), pre[hot_rows].flatten()])
        pool_rows = torch.cat([cold.repeat_interleave(m), hot_rows.repeat_interleave(d_sae)])
        every_col = torch.arange(d_sae, device=pre.device).repeat(len(hot_rows))
        pool_cols = torch.cat([cand.indices[cold].flatten(), every_col])
        top = pool.topk(keep, sorted=False)
        rows, cols = pool_rows[top.indices], pool_cols[top.indices]
    order = torch.argsort(rows, stable=True)
    return rows[order], cols[order]


@register
class BatchTopKSAE(TopKSAE):
    """A TopK SAE whose training activation is batch top-k and whose inference activation is a threshold."""

    method: ClassVar[str] = "batchtopk"
    config_cls: ClassVar[type[BatchTopKConfig]] = BatchTopKConfig
    cfg: BatchTopKConfig

    def __init__(self, cfg: BatchTopKConfig, d_in: int) -> None:
        super().__init__(cfg, d_in)
        # -1 marks "not fitted yet": the first training batch sets it without averaging.
        self.register_buffer("threshold", torch.full((), -1.0))
        # Optimizer steps so far, for the threshold's decay schedule (saved by checkpoints: COUNTERS).
        self.steps_taken = 0

    def _topk_codes(self, pre: Tensor) -> Tensor:
        if self.training:
            codes = batch_topk(pre, self.k)
            self._update_threshold(codes.detach())
            return codes
        # Strictly above: a threshold of exactly 0 must not turn every zero pre-activation into a code.
        return pre * (pre > self.threshold.clamp_min(0)).to(pre.dtype)

    def _select_entries(self, pre: Tensor) -> tuple[Tensor, Tensor]:
        """Sparse-path entries: the batch top-k (training, threshold updated) or those above the threshold."""
        if not self.training:
            rows, cols = (pre > self.threshold.clamp_min(0)).nonzero(as_tuple=True)
            return rows, cols
        rows, cols = batch_topk_entries(pre, self.k)
        self._update_threshold(pre[rows, cols].relu())
        return rows, cols

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        super().after_optimizer_step()
        self.steps_taken += 1

    def threshold_decay(self) -> float:
        """This update's EMA decay: (1 + t) / (50 + t) after t optimizer steps, at most threshold_beta."""
        t = self.steps_taken
        return min(self.cfg.threshold_beta, (1 + t) / (50 + t))

    @torch.no_grad()
    def _update_threshold(self, codes: Tensor) -> None:
        positive = codes[codes > 0]
        if positive.numel() == 0:
            return
        smallest = positive.min()
        if self.threshold < 0:
            self.threshold.copy_(smallest)
        else:
            beta = self.threshold_decay()
            self.threshold.mul_(beta).add_((1 - beta) * smallest)
