"""The float64 statistics of a cache's shards: per-dimension sums and sums of squares and summed row norms,
from which the manifest's mean, rms, total_variance, mean_norm and mean_squared_norm follow.

Summed shard by shard, each in fixed chunks of rows (their size a function of the width alone), so a cache
written in one run, resumed after a kill or assembled from parts gets the same figures to the bit, whichever
thread or process summed each shard.
"""

from __future__ import annotations

import torch

CHUNK_BYTES = 1 << 21  # one float64 chunk: small enough to stay in a core's cache through the five passes
DEVICE_CHUNK_ROWS = 8192  # on an accelerator: each chunk costs kernel launches, not cache misses


def chunk_rows(d_in: int, device: torch.device | str = "cpu") -> int:
    """Rows per chunk at width `d_in`: on the CPU 2 MiB of float64, between 16 and 1,024 rows; on an
    accelerator `DEVICE_CHUNK_ROWS`, where cache-sized chunks would multiply its kernel launches 100-fold.

    Each chunk is converted to float64, squared and reduced three times; a chunk that fits in a core's cache
    is read from there, not from memory. On one core, bfloat16 shards of 16,384 rows: at d_in 2048 36 ms
    (450,000 rows/s) against 98 ms in chunks of 8,192 rows, at d_in 4096 67 ms (240,000 rows/s) against 190.
    """
    if torch.device(device).type != "cpu":
        return DEVICE_CHUNK_ROWS
    return max(16, min(1024, CHUNK_BYTES // (8 * d_in)))


def stats_scratch(d_in: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two float64 CPU buffers of one chunk of rows, for `shard_statistics` to reuse."""
    rows = chunk_rows(d_in)
    return torch.empty(rows, d_in, dtype=torch.float64), torch.empty(rows, d_in, dtype=torch.float64)


def shard_statistics(
    shard: torch.Tensor, scratch: tuple[torch.Tensor, torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Per-dimension sum and sum of squares (float64) and the summed row norms of one shard.

    Chunked (`chunk_rows`), so memory stays at a few MB over the shard whatever its size; the same function
    serves a run and an adoption of its shards, so both sum in the same order and agree to the bit. With
    `scratch` (`stats_scratch`) the float64 chunks are written into it rather than into fresh memory: the
    same numbers, three to ten times faster on CPU (measured at d_in 128 and 2304).
    """
    d_in = shard.shape[-1]
    total = torch.zeros(d_in, dtype=torch.float64, device=shard.device)
    total_sq = torch.zeros(d_in, dtype=torch.float64, device=shard.device)
    norm_sum = torch.zeros((), dtype=torch.float64, device=shard.device)
    for chunk in shard.split(chunk_rows(d_in, shard.device)):
        if scratch is None:
            a64 = chunk.double()
            sq = a64 * a64
        else:  # contiguous slices of the same shape: the reductions run in the same order
            a64 = scratch[0][: chunk.shape[0]].copy_(chunk)
            sq = torch.mul(a64, a64, out=scratch[1][: chunk.shape[0]])
        total += a64.sum(0)
        total_sq += sq.sum(0)
        norm_sum += sq.sum(1).sqrt().sum()
    return total.cpu(), total_sq.cpu(), float(norm_sum)


def summarize(total: torch.Tensor, total_sq: torch.Tensor, norm_sum: float, rows: int) -> dict:
    """The manifest's statistics of a hookpoint from its float64 sums over `rows` rows."""
    n = max(rows, 1)
    mean = total / n
    var = total_sq / n - mean**2
    return {
        "mean": mean.tolist(),
        "rms": (total_sq / n).sqrt().tolist(),
        "total_variance": float(var.clamp_min(0).sum()),
        "mean_norm": norm_sum / n,
        "mean_squared_norm": float(total_sq.sum()) / n,
    }
