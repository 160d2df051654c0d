"""Lazy, read-only access to selected activation rows of a cache, one shard in memory at a time.

`ShardRows(store, hookpoint)(rows)` reads the activations of any ascending cache rows; `ShardedActs` is a
view of a fixed row selection that answers `.shape`, `.ndim`, `.dtype`, `.device` and contiguous slices
`view[a:b]`, which is all the streamed labeling passes ask of an activation tensor, so they run over caches
larger than memory. The shards' checksums were verified when the `ActivationCache` was opened.
"""

from __future__ import annotations

import bisect
import ctypes
import ctypes.util
import functools
from collections.abc import Iterator

import torch

from featureatlas.tasks.common.store import ActivationCache

__all__ = ["ShardRows", "ShardedActs", "release_freed_memory"]


@functools.cache
def _malloc_trim():
    """glibc's `malloc_trim`, or None (another C library): looked up once, on first use."""
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


def release_freed_memory() -> None:
    """Hand the memory of freed buffers back to the system. glibc keeps freed multi-MB blocks (a shard, a
    batch of dense codes) in its heaps once its mmap threshold has risen past their size, and the passes
    over a cache allocate and free such blocks per batch, so without this the process grows over a pass by
    the heap fragments it leaves, more with more shards. Called when a shard is dropped and after a pass:
    a few milliseconds, no effect on results. A no-op outside glibc."""
    fn = _malloc_trim()
    if fn is not None:
        fn(0)


class ShardRows:
    """Activations of cache rows read shard by shard (stored, or recomputed for an unstored cache)."""

    def __init__(self, store: ActivationCache, hookpoint: str):
        info = store.manifest["hookpoints"].get(hookpoint)
        if info is None:
            raise ValueError(f"hookpoint {hookpoint!r} is not in this cache; cached: {store.hookpoints}")
        self.store, self.hookpoint = store, hookpoint
        self.starts = [0]
        for s in info["shards"]:
            self.starts.append(self.starts[-1] + int(s["rows"]))
        self.d_in = int(info["d_in"])
        self._cached: tuple[int, torch.Tensor] | None = None
        self.dtype = self._shard(0).dtype if info["shards"] else torch.float32

    def _shard(self, i: int) -> torch.Tensor:
        if self._cached is None or self._cached[0] != i:
            if self._cached is not None:
                self._cached = None  # the previous shard goes before the next is read
                release_freed_memory()
            self._cached = (i, self.store.read_shard(self.hookpoint, i))
        return self._cached[1]

    def __call__(self, wanted: torch.Tensor) -> torch.Tensor:
        """`[len(wanted), d_in]` activations of the ascending cache rows `wanted`."""
        parts = []
        lo = 0
        while lo < len(wanted):
            shard = bisect.bisect_right(self.starts, int(wanted[lo])) - 1
            end = self.starts[shard + 1]
            hi = lo + int(torch.searchsorted(wanted[lo:], torch.tensor(end)))
            parts.append(self._shard(shard)[wanted[lo:hi] - self.starts[shard]])
            lo = hi
        return torch.cat(parts) if parts else torch.empty(0, self.d_in, dtype=self.dtype)


class ShardedActs:
    def __init__(self, store: ActivationCache, hookpoint: str, rows: torch.Tensor):
        self.reader = ShardRows(store, hookpoint)
        self.rows = rows.long()
        self.shape = torch.Size([len(self.rows), self.reader.d_in])
        self.ndim = 2
        self.device = torch.device("cpu")
        self.dtype = self.reader.dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: slice) -> torch.Tensor:
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError("ShardedActs supports contiguous slices only, e.g. view[a:b]")
        return self.reader(self.rows[index])

    def batches(self, batch_size: int = 4096) -> Iterator[torch.Tensor]:
        for lo in range(0, len(self), batch_size):
            yield self[lo : lo + batch_size]
