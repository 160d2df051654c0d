"""Shuffled training batches from an activation cache larger than memory.

Rows of one context sit next to each other in a shard, and a context's tokens are strongly correlated, so
batches must mix sequences and shards, not just shuffle within one. Each epoch draws a seeded permutation of
the shards; they are read `buffer_shards` at a time, the selected rows of the group are shuffled together
(with the few rows left over from the previous group) and cut into batches. Memory holds at most
`buffer_shards + 1` shards; every selected row is yielded exactly once per epoch; the same (seed, epoch)
gives the same batches.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from featureatlas.tasks.common.store import StreamBatch

if TYPE_CHECKING:
    from featureatlas.tasks.common.store import ActivationCache


def stream_batches(
    cache: ActivationCache,
    hookpoint: str,
    rows: torch.Tensor,
    *,
    batch_size: int,
    seed: int,
    epoch: int = 0,
    buffer_shards: int = 4,
) -> Iterator[StreamBatch]:
    """Batches of `batch_size` rows (the last one may be smaller), shuffled across shards and sequences."""
    if batch_size < 1 or buffer_shards < 1:
        raise ValueError(f"batch_size ({batch_size}) and buffer_shards ({buffer_shards}) must be at least 1")
    shard_tokens = int(cache.manifest["shard_tokens"])
    n_shards = len(cache._info(hookpoint)["shards"])
    rows = rows.to(torch.int64)
    shard_of = rows // shard_tokens  # every shard but the last holds exactly shard_tokens rows
    # one generator per (seed, epoch): epochs differ, reruns agree
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n_shards, generator=gen).tolist()
    carry_acts: list[torch.Tensor] = []
    carry_rows: list[torch.Tensor] = []
    for start in range(0, n_shards, buffer_shards):
        acts_parts, row_parts = list(carry_acts), list(carry_rows)
        for s in order[start : start + buffer_shards]:
            selected = rows[shard_of == s]
            if selected.numel() == 0:
                continue  # no need to read a shard none of whose rows are wanted
            acts_parts.append(cache.read_shard(hookpoint, s)[selected - s * shard_tokens])
            row_parts.append(selected)
        if not row_parts:
            continue
        acts, group_rows = torch.cat(acts_parts), torch.cat(row_parts)
        perm = torch.randperm(group_rows.numel(), generator=gen)
        acts, group_rows = acts[perm], group_rows[perm]
        full = group_rows.numel() // batch_size * batch_size
        for b in range(0, full, batch_size):
            yield StreamBatch(acts[b : b + batch_size], group_rows[b : b + batch_size])
        carry_acts, carry_rows = [acts[full:]], [group_rows[full:]]
    if carry_rows and carry_rows[0].numel():
        yield StreamBatch(carry_acts[0], carry_rows[0])
