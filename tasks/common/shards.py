"""Writing a cache's shards: checksummed, atomically renamed safetensors files, their float64 statistics, and
the resume state (each shard's sha256 and statistics recorded beside it until assembly) that an interrupted
run checks and the assembly sums.

`ShardWriter` writes one hookpoint's shards off the caller's thread; the resume records and `finished_shards`,
which tells a resumed run which shards it may keep, are in `shard_records`. Reading a finished cache is
`store.ActivationCache`'s work.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Callable, Collection
from concurrent.futures import Executor, Future
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from featureatlas.tasks.common.models import DTYPES
from featureatlas.tasks.common.shard_records import (
    hookpoint_dir,
    record_shard,
    recorded_sha256,
    recorded_stats,
    sha256_file,
)
from featureatlas.tasks.common.shard_stats import shard_statistics, stats_scratch, summarize
from featureatlas.tasks.common.threads import side_pool
from featureatlas.tasks.tracking.errors import Refusal
from featureatlas.tasks.tracking.paths import inside

_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def write_acts_shard(
    acts: torch.Tensor,
    path: Path,
    before_rename: Callable[[str], None] | None = None,
    *,
    sync: bool = True,
    hash_pool: Executor | None = None,
) -> str:
    """Write `acts [rows, d_in]` as a one-tensor safetensors file, atomically; return its sha256.

    `before_rename(sha256)` runs once the file is complete (and, with `sync`, fsynced), before it takes its
    final name. `sync=False` leaves the fsync to the caller (`fsync_file`), after the rename. With
    `hash_pool` the rows are hashed there while this thread writes them (both release the GIL), so a shard
    costs the longer of the two rather than their sum.

    The same bytes `safetensors.torch.save({"acts": acts})` makes (a test holds them equal), streamed from the
    tensor's memory without the serialised copy, and hashed on the way out instead of read back.
    """
    acts = acts.contiguous()
    raw = memoryview((acts.view(torch.int16) if acts.dtype == torch.bfloat16 else acts).numpy()).cast("B")
    meta = {"dtype": _ST_DTYPES[acts.dtype], "shape": list(acts.shape), "data_offsets": [0, raw.nbytes]}
    header = json.dumps({"acts": meta}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # safetensors pads the header to 8-byte alignment
    head = struct.pack("<Q", len(header)) + header
    h = hashlib.sha256(head)
    hashed = hash_pool.submit(h.update, raw) if hash_pool is not None else None
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open("wb") as f:
            f.write(head)
            f.write(raw)
            if hashed is None:
                h.update(raw)
            f.flush()
            if sync:
                os.fsync(f.fileno())
    finally:
        if hashed is not None:
            hashed.result()  # never return (or raise) while the hash still reads the rows
    tmp.chmod(0o644)
    if before_rename is not None:
        before_rename(h.hexdigest())
    os.replace(tmp, path)
    return h.hexdigest()


def fsync_file(path: Path) -> None:
    """Flush a file written earlier to the disk."""
    with path.open("rb") as f:
        os.fsync(f.fileno())


def atomic_write_text(text: str, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class ShardWriter:
    """Buffers rows of one hookpoint and writes fixed-size shards, keeping statistics per shard.

    Statistics are summed shard by shard (in float64, from the rows as stored), so a cache resumed after a
    kill, or assembled from parts, ends with exactly the figures of one made in a single run.

    The caller's thread only copies rows into a shard buffer of the stored dtype (cast on the model's device
    first, so a bfloat16 copy crosses the bus, into pinned memory); nothing else is copied. Per hookpoint one
    thread sums each full shard's float64 statistics while a second one serialises and renames it, a third
    hashes the same rows as they are written and a fourth fsyncs it. Hashing, file writes and torch kernels
    release the GIL, so none holds up the forward passes; at most two shards are in flight and their buffers
    are reused, so memory stays at three shards. The hash beside the write makes a shard cost the longer of
    the two rather than their sum (`hash_beside=False`: in line, in turn); at d_in 4096 in bfloat16 the
    sha256 alone runs at about 220,000 rows/s on one core and the statistics at 240,000
    (`shard_stats.chunk_rows`), above the 10^5 tokens/s per hookpoint of a GPU's forward passes
    (`benchmarks/bench_writer.py`). A failed write, sum or fsync is raised in the caller's thread, by the next
    `add` that waits on it or by `finish`.

    The fsync comes after the rename, on its own thread, because a shard's buffer is free once its bytes are
    in the page cache: waiting for the disk there held up the forward passes (caching 1.32x the bare forward
    on a 2-core machine with a virtual disk, 1.14x without the wait). `finish` returns once every shard is on
    disk, so a manifest, written after it, never lists a shard that a power loss could take back; a shard cut
    by one before `finish` is not adopted on resuming (`finished_shards` checks its size and sha256).

    A part of a cache split into jobs (`first_shard`, `stats=False`) numbers its shards from `first_shard`
    and records each one's sha256 and statistics beside it (`record_shard`), so the assembly step sums the
    statistics in order without reading the shards again. `verified` lists the shards whose sha256 this
    writer computed from the bytes it wrote.
    """

    def __init__(
        self,
        folder: Path,
        hookpoint: str,
        d_in: int,
        dtype: str,
        shard_tokens: int,
        layout: dict | None = None,
        *,
        first_shard: int = 0,
        stats: bool = True,
        hash_beside: bool = True,
    ):
        if dtype not in DTYPES:
            raise ValueError(f"shard dtype {dtype!r} not understood; use one of {sorted(DTYPES)}")
        self.root = folder
        self.folder = folder / "acts" / hookpoint_dir(hookpoint)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.hookpoint, self.d_in, self.dtype, self.shard_tokens = (
            hookpoint,
            d_in,
            DTYPES[dtype],
            shard_tokens,
        )
        self.layout = layout or {}
        self.shards: list[dict] = []
        self.n_shards = first_shard  # next shard number (self.shards lists those recorded)
        self.stats = stats
        self.verified: set[int] = set()
        self._fill: torch.Tensor | None = None  # the shard buffer being filled, `buffered` rows so far
        self.buffered = 0
        self._free: list[torch.Tensor] = []  # buffers of shards written and summed
        self._scratch: tuple[torch.Tensor, torch.Tensor] | None = None  # float64 chunks of the statistics
        name = hookpoint_dir(hookpoint)
        self._pool = side_pool(f"shards-{name}")
        self._stats_pool = side_pool(f"stats-{name}")
        self._hash_pool = side_pool(f"hash-{name}") if hash_beside else None
        self._sync_pool = side_pool(f"fsync-{name}")
        self._syncs: list[Future] = []  # fsyncs not yet known to be done, in shard order
        self._pending: list[tuple[Future, Future, torch.Tensor]] = []
        # float64 sums: float32 loses the small per-dimension variances over 10^6 rows
        self.sum = torch.zeros(d_in, dtype=torch.float64)
        self.sumsq = torch.zeros(d_in, dtype=torch.float64)
        self.norm_sum = 0.0
        self.rows = 0

    def adopt(self, n_shards: int, verified: Collection[int] = ()) -> None:
        """Take over the first `n_shards` finished shards of an interrupted run or of parts; delete any later
        ones.

        Each shard must hash to the sha256 recorded when it was written (`record_shard`); one that does not
        is deleted, so that running the caching again recomputes it, and refused. Shards in `verified` were
        hashed in this process already (written, or checked on resuming) and are not read again; the
        statistics come from each shard's record where it has one, else from the shard itself.
        """
        for i in range(n_shards):
            path = self.folder / f"{i:05d}.safetensors"
            recorded = recorded_sha256(path)
            sha256 = recorded if i in verified and recorded else sha256_file(path)
            if recorded != sha256:
                path.unlink()
                raise CacheIntegrityError(
                    f"shard {path} of hookpoint {self.hookpoint!r} does not match the checksum recorded when "
                    "it was written (changed on disk, or never finished); it was deleted: run the caching "
                    "again to recompute it"
                )
            stats = recorded_stats(path, sha256, self.d_in)
            if stats is None:
                shard = load_file(str(path))["acts"]
                stats, rows = shard_statistics(shard), shard.shape[0]
            else:
                with safe_open(str(path), "pt") as f:
                    rows = f.get_slice("acts").get_shape()[0]
            self._add_stats(stats, rows)
            self._record(rows, path, sha256)
        self.n_shards = n_shards
        for path in self.folder.iterdir():
            if not path.name.endswith(".safetensors") or int(path.name.split(".")[0]) >= n_shards:
                path.unlink()  # a record, a later shard, or a temporary file a kill left behind

    def add(self, acts: torch.Tensor) -> None:
        """Append rows `acts [n, d_in]` (any device and float dtype); full shards go to the writer threads."""
        if acts.shape[-1] != self.d_in:
            raise ValueError(f"{self.hookpoint}: got width {acts.shape[-1]}, expected {self.d_in}")
        acts = acts.detach()
        if acts.device.type != "cpu":
            acts = acts.to(self.dtype)  # cast first: half the bytes over the bus
        done = 0
        while done < acts.shape[0]:
            if self._fill is None:
                self._fill = self._buffer(pinned=acts.device.type == "cuda")
            take = min(acts.shape[0] - done, self.shard_tokens - self.buffered)
            # one copy into the shard buffer (on CPU it casts on the way)
            self._fill[self.buffered : self.buffered + take].copy_(acts[done : done + take])
            self.buffered += take
            done += take
            if self.buffered == self.shard_tokens:
                self._flush()

    def _buffer(self, pinned: bool) -> torch.Tensor:
        if self._free:
            return self._free.pop()
        return torch.empty(self.shard_tokens, self.d_in, dtype=self.dtype, pin_memory=pinned)

    def _flush(self) -> None:
        buffer, shard = self._fill, self._fill[: self.buffered]
        self._fill, self.buffered = None, 0
        index = self.n_shards
        self.n_shards += 1
        # at most two shards in flight: writing may lag behind the model, memory stays bounded
        while len(self._pending) >= 2:
            self._wait(self._pending.pop(0))
        summed = self._stats_pool.submit(self._sum, shard)
        written = self._pool.submit(self._write, shard, index, summed)
        self._pending.append((written, summed, buffer))

    def _wait(self, pending: tuple[Future, Future, torch.Tensor]) -> None:
        written, summed, buffer = pending
        try:
            written.result()  # re-raises a failed write (or sum) here, in the caller's thread
            summed.result()
        except BaseException:
            self._stop()
            raise
        self._free.append(buffer)

    def _stop(self) -> None:
        """After a failure: cancel the queued work and wait for the running, so nothing is written once the
        error is raised."""
        for pool in (self._stats_pool, self._pool, self._hash_pool, self._sync_pool):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

    def _sum(self, shard: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """On the statistics thread: float64 sums of one shard, in chunk buffers kept from shard to shard."""
        if self._scratch is None:
            self._scratch = stats_scratch(self.d_in)
        return shard_statistics(shard, self._scratch)

    def _write(self, shard: torch.Tensor, index: int, summed: Future) -> None:
        """On the writer thread, in shard order: write (hashed beside it), record and rename, then add the
        statistics."""
        path = self.folder / f"{index:05d}.safetensors"
        # a part of a resumable cache: its records (checksum, statistics) are in place before the rename
        record = None if self.stats else (lambda sha256: record_shard(path, sha256, summed.result()))
        sha256 = write_acts_shard(shard, path, before_rename=record, sync=False, hash_pool=self._hash_pool)
        while self._syncs and self._syncs[0].done():
            self._syncs.pop(0).result()  # a failed fsync is raised by the next write, or by `finish`
        self._syncs.append(self._sync_pool.submit(fsync_file, path))
        self._add_stats(summed.result(), shard.shape[0])
        self._record(shard.shape[0], path, sha256)
        self.verified.add(index)

    def _add_stats(self, stats: tuple[torch.Tensor, torch.Tensor, float], rows: int) -> None:
        total, total_sq, norm_sum = stats
        self.sum += total
        self.sumsq += total_sq
        self.norm_sum += norm_sum
        self.rows += rows

    def _record(self, rows: int, path: Path, sha256: str) -> None:
        self.shards.append(
            {
                "file": str(path.relative_to(self.root)),
                "rows": int(rows),
                "bytes": path.stat().st_size,
                "sha256": sha256,
            }
        )

    def finish(self) -> dict:
        if self.buffered:
            self._flush()
        for pending in self._pending:
            self._wait(pending)
        try:
            for synced in self._syncs:  # every shard on disk before the caller records it anywhere
                synced.result()
        except BaseException:
            self._stop()
            raise
        self._pending, self._free, self._fill, self._scratch, self._syncs = [], [], None, None, []
        self._pool.shutdown()
        self._stats_pool.shutdown()
        if self._hash_pool is not None:
            self._hash_pool.shutdown()
        self._sync_pool.shutdown()
        return {"d_in": self.d_in, "rows": self.rows, **self.layout, "shards": self.shards, **self.summary()}

    def summary(self) -> dict:
        """mean, rms, total_variance, mean_norm and mean_squared_norm of the rows summed so far."""
        return summarize(self.sum, self.sumsq, self.norm_sum, self.rows)


class CacheIntegrityError(Refusal):
    """A shard is missing, truncated or does not match its checksum."""


def check_shard_size(folder: Path, hookpoint: str, shard: dict) -> Path:
    """The shard's path, once it is known to exist with the size the manifest records."""
    try:
        path = inside(folder, shard["file"])
    except ValueError as e:
        raise CacheIntegrityError(f"manifest of {folder} names shard {shard['file']!r}: {e}") from None
    if not path.is_file():
        raise CacheIntegrityError(f"shard {path} of hookpoint {hookpoint!r} is missing; rebuild the cache")
    size = path.stat().st_size
    if size != shard["bytes"]:
        raise CacheIntegrityError(
            f"shard {path} of hookpoint {hookpoint!r} is truncated or corrupt ({size} bytes, the manifest "
            f"says {shard['bytes']}; checksum mismatch); delete the cache folder and run the pipeline again"
        )
    return path
