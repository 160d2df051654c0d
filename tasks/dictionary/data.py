"""Where training batches come from: an in-memory tensor, or an activation cache streamed shard by shard.

A source yields each epoch as a sequence of shuffled row chunks; `batches` cuts the back-to-back epochs into
full batches (a batch may straddle two epochs: a one-row tail batch would have zero variance, leaving the FVU
undefined). Batch `b` is a pure function of (seed, batch_size, b), so a resumed run, or a dictionary trained
inside a sweep, sees exactly the batches of an uninterrupted run trained alone. Every row is checked before
any dictionary sees it: width `d_in`, finite values (a cache's rows once per shard read, in the reader's
thread, naming the shard that holds a NaN or inf).

Initialisation from data (input scale, `b_dec`) uses `init_sample`: all rows when they fit in
`INIT_SAMPLE_ROWS`, else a bounded sample, so a cache larger than memory is never loaded whole.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import torch
from torch import Tensor

from featureatlas.tasks.common.selection import RowSelection
from featureatlas.tasks.common.store import ActivationCache, StreamBatch

# Rows used to fit the input scale and b_dec: enough for a mean to 3 digits, small enough for any machine.
INIT_SAMPLE_ROWS = 65_536


class BadActivations(ValueError):
    """Activations that training cannot use (NaN, inf, wrong width, none at all); the message says which."""


class ActivationSource(Protocol):
    """What the trainer reads: `n_rows` rows of width `d_in`, in seeded shuffled epochs."""

    d_in: int
    n_rows: int

    def epoch(self, epoch: int, batch_size: int, seed: int) -> Iterator[Tensor]:
        """The rows of one epoch, every row once, as chunks [rows, d_in] in a seeded order."""
        ...

    def init_sample(self, max_rows: int = INIT_SAMPLE_ROWS) -> Tensor:
        """At most `max_rows` rows [rows, d_in] for fitting input statistics."""
        ...

    def materialize(self) -> Tensor:
        """Every row as one tensor, for the methods that are not minibatch-trained (semi-NMF)."""
        ...


def _check_chunk(chunk: Tensor, d_in: int, where: str) -> None:
    """Raise BadActivations naming `where` if `chunk` has the wrong width or a non-finite value."""
    if chunk.shape[-1] != d_in:
        raise BadActivations(
            f"{where} has width {chunk.shape[-1]}, but the activations are declared with d_in={d_in}; "
            "the cache is inconsistent: delete it and cache again"
        )
    if not bool(torch.isfinite(chunk).all()):
        raise BadActivations(
            f"{where} holds NaN or inf activations; recompute the cache (e.g. the model in float32, or "
            "dtype bfloat16 instead of float16 for large residual norms)"
        )


def validate_acts(acts: Tensor, chunk_rows: int = 65_536) -> None:
    """Refuse an in-memory activation tensor that training cannot use, saying how to fix it."""
    if not isinstance(acts, Tensor):
        raise TypeError(f"acts must be a torch.Tensor, got {type(acts).__name__}; use torch.from_numpy(...)")
    if acts.ndim != 2:
        raise BadActivations(
            f"acts must be [n_tokens, d_in], got shape {tuple(acts.shape)}; "
            "flatten with acts.reshape(-1, acts.shape[-1])"
        )
    if not acts.is_floating_point():
        raise BadActivations(f"acts must be floating point, got {acts.dtype}; cast with acts.float()")
    if acts.shape[0] < 2 or acts.shape[1] < 1:
        raise BadActivations(f"acts has shape {tuple(acts.shape)}; training needs >= 2 tokens and d_in >= 1")
    # Chunked so a large tensor is not doubled in memory by one boolean mask.
    for start in range(0, acts.shape[0], chunk_rows):
        finite = torch.isfinite(acts[start : start + chunk_rows]).all(dim=1)
        if not bool(finite.all()):
            row = start + int((~finite).nonzero()[0])
            raise BadActivations(
                f"acts row {row} holds NaN or inf; drop or recompute those rows before training"
            )


class TensorSource:
    """Rows of an in-memory tensor [n, d_in], checked once up front; one seeded permutation per epoch."""

    def __init__(self, acts: Tensor) -> None:
        validate_acts(acts)
        self.acts = acts
        self.n_rows, self.d_in = acts.shape
        self._next: tuple[int, int, torch.Generator] | None = None  # (seed, epoch) the generator is at

    def epoch(self, epoch: int, batch_size: int, seed: int) -> Iterator[Tensor]:  # noqa: ARG002
        # Epoch e is the (e+1)-th permutation of one seeded generator: the data order of the loop before
        # streaming existed. Read in order, the generator just goes on; anything else replays it.
        if self._next is not None and self._next[:2] == (seed, epoch):
            gen = self._next[2]
        else:
            gen = torch.Generator().manual_seed(seed)
            for _ in range(epoch):
                torch.randperm(self.n_rows, generator=gen)
        perm = torch.randperm(self.n_rows, generator=gen)
        self._next = (seed, epoch + 1, gen)
        for start in range(0, self.n_rows, 65_536):
            yield self.acts[perm[start : start + 65_536]]

    def init_sample(self, max_rows: int = INIT_SAMPLE_ROWS) -> Tensor:
        stride = -(-self.n_rows // max_rows)  # ceil: at most max_rows rows, evenly strided
        return self.acts[::stride]

    def materialize(self) -> Tensor:
        return self.acts


class CacheSource:
    """The selected rows of one hookpoint of a cache, streamed `buffer_shards` shards at a time.

    `rows` is a `RowSelection` (default: the train split, counted per shard, each shard's rows read when the
    shard is) or a tensor of row numbers; no tensor of every selected row is made from the token table.
    """

    def __init__(
        self,
        cache: ActivationCache,
        hookpoint: str,
        rows: Tensor | RowSelection | None = None,
        *,
        buffer_shards: int = 4,
        pin_memory: bool | None = None,
    ) -> None:
        info = cache._info(hookpoint)  # refuses an unknown hookpoint, listing the cached ones
        self.cache, self.hookpoint, self.buffer_shards = cache, hookpoint, buffer_shards
        # pinned host memory lets the trainer's non_blocking copy to the GPU overlap the step
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.selection = cache.as_selection(hookpoint, rows)
        self.n_rows = self.selection.n_rows
        self.d_in = int(info["d_in"])
        self.shard_tokens = int(cache.manifest["shard_tokens"])
        if self.n_rows < 2:
            raise BadActivations(
                f"the cache at {cache.folder} holds {self.n_rows} training row(s) for {hookpoint!r}; "
                "training needs >= 2: cache more tokens (corpus max_tokens) or lower heldout_fraction"
            )

    def check_shard(self, shard: int, acts: Tensor) -> None:
        """Refuse the selected rows `acts` of `shard` if they have the wrong width or a NaN or inf, naming
        the shard's file. Run once per shard read (in the stream's reader thread), not once per batch."""
        # one pass and no boolean copy: a sum is finite only if every term is (fp16 sums in float32, so a
        # large but finite shard does not overflow; one that still does is checked element by element)
        total = acts.sum(dtype=torch.float32 if acts.element_size() < 4 else None)
        if acts.shape[-1] != self.d_in or not bool(torch.isfinite(total)):
            file = self.cache._info(self.hookpoint)["shards"][shard]["file"]
            _check_chunk(acts, self.d_in, f"shard {file} of {self.cache.folder}")

    # `epoch(..., skip=a, limit=b)` reads only the shards holding the epoch's rows [a, b)
    skips = True

    def stream(
        self, epoch: int, batch_size: int, seed: int, skip: int = 0, limit: int | None = None
    ) -> Iterator[StreamBatch]:
        """The epoch's batches with their row numbers, every shard checked as it is read."""
        return self.cache.stream(
            self.hookpoint,
            self.selection,
            batch_size=batch_size,
            seed=seed,
            epoch=epoch,
            buffer_shards=self.buffer_shards,
            skip=skip,
            limit=limit,
            pin_memory=self.pin_memory,
            check=self.check_shard,
        )

    def epoch(
        self, epoch: int, batch_size: int, seed: int, skip: int = 0, limit: int | None = None
    ) -> Iterator[Tensor]:
        for b in self.stream(epoch, batch_size, seed, skip, limit):
            yield b.acts

    def init_sample(self, max_rows: int = INIT_SAMPLE_ROWS) -> Tensor:
        """The selected rows of whole shards, in a fixed shuffled order, until `max_rows` are taken."""
        counts = self.selection.counts
        parts, taken = [], 0
        for s in torch.randperm(counts.numel(), generator=torch.Generator().manual_seed(0)).tolist():
            if not counts[s]:
                continue
            selected = self.selection.shard(s)[: max_rows - taken]
            acts = self.cache.read_shard(self.hookpoint, s)[selected - s * self.shard_tokens]
            self.check_shard(s, acts)
            parts.append(acts)
            taken += selected.numel()
            if taken >= max_rows:
                break
        return torch.cat(parts)

    def materialize(self) -> Tensor:
        """Every selected row, shard by shard (for the token table's selection: in row order)."""
        acts = self.cache.load(self.hookpoint, self.selection)
        at = 0
        for s, count in enumerate(self.selection.counts.tolist()):
            if count:
                self.check_shard(s, acts[at : at + count])
            at += count
        return acts


def seen_record(source: ActivationSource, steps: int, batch_size: int) -> dict | None:
    """What a dictionary trained on forward passes saw (None for stored activations): tokens trained on,
    tokens run through the model, and the float64 statistics of the hookpoint's recomputed rows."""
    cache = getattr(source, "cache", None)
    if not isinstance(source, CacheSource) or cache is None or cache.stored:
        return None
    recompute = cache.recompute
    return {
        "streamed": True,
        "tokens_trained": steps * batch_size,
        "forward_tokens": recompute.forward_tokens,
        "hookpoint": source.hookpoint,
        "statistics": recompute.seen(source.hookpoint),
    }


def batches(
    source: ActivationSource, batch_size: int, seed: int, start: int = 0, stop: int | None = None
) -> Iterator[Tensor]:
    """Full batches [batch_size, d_in] from back-to-back epochs, from batch index `start` (0-based) on.

    Skipping to `start` reads only the epoch it falls in (a source with `skips`, only the shards holding rows
    from there on): batch b begins at row b * batch_size of the concatenated epochs. With `stop` (the batch
    index the caller ends before), a source with `skips` reads nothing past it.
    """
    n = source.n_rows
    epoch, offset = divmod(start * batch_size, n)
    pending: list[Tensor] = []
    held = 0
    while True:
        if getattr(source, "skips", False):
            # the source leaves the rows before `offset` and after `stop` out itself, reading none of their
            # shards (for a cache recomputed from the model: running none of their forward passes)
            limit = None if stop is None else stop * batch_size - epoch * n
            chunks, offset = source.epoch(epoch, batch_size, seed, skip=offset, limit=limit), 0
        else:
            chunks = source.epoch(epoch, batch_size, seed)
        for chunk in chunks:
            if offset:  # rows of this epoch that batches before `start` consumed
                drop = min(offset, chunk.shape[0])
                chunk, offset = chunk[drop:], offset - drop
                if chunk.shape[0] == 0:
                    continue
            pending.append(chunk)
            held += chunk.shape[0]
            while held >= batch_size:
                data = torch.cat(pending) if len(pending) > 1 else pending[0]
                yield data[:batch_size]
                rest = data[batch_size:]
                pending, held = ([rest] if rest.shape[0] else []), rest.shape[0]
        epoch += 1
