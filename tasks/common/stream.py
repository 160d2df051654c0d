"""Shuffled training batches from an activation cache larger than memory.

Rows of one context sit next to each other in a shard, and a context's tokens are strongly correlated, so
batches must mix sequences and shards, not just shuffle within one. Each epoch draws a seeded permutation of
the shards; they are read `buffer_shards` at a time, the selected rows of the group are shuffled together
(with the few rows left over from the previous group) and cut into batches. Every selected row is yielded
exactly once per epoch; the same (seed, epoch) gives the same batches.

The order depends on row numbers alone, never on the data, so it is planned first (`_plan`) from the
number of selected rows of each shard: a run resumed at output row `skip` reads (or, for a cache recomputed
from the model, runs the forward passes of) only the groups holding rows at or after `skip`, and yields
exactly the batches an uninterrupted epoch yields from there on. The plan holds a few numbers per group and
one generator state, never a row: each group's permutation is redrawn when the group is read, and its rows
come from the `RowSelection` shard by shard, so memory does not grow with the corpus. A background thread
reads the next group while the current one is consumed (`prefetch`), and can place it in pinned memory
(`pin_memory`), so a host-to-GPU copy with `non_blocking=True` overlaps the training step. Memory holds at
most two groups plus the carried rows.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch

from featureatlas.tasks.common.selection import RowSelection
from featureatlas.tasks.common.store import StreamBatch

ShardReader = Callable[[int], torch.Tensor]
ShardCheck = Callable[[int, torch.Tensor], None]  # (shard, its selected rows' activations): raises if bad


class _Group(NamedTuple):
    shards: list[int]
    n_own: int  # selected rows of its shards
    n_carry: int  # rows carried in from the previous group
    out_start: int  # output position of the group's first yielded row
    n_full: int  # rows yielded as full batches; the rest are carried on


class _Plan(NamedTuple):
    groups: list[_Group]
    first: int  # the first group to read: every row of an earlier group is yielded before `skip`
    state: torch.Tensor | None  # the generator's state just before group `first` draws its permutation


def _plan(counts: list[int], batch_size: int, gen: torch.Generator, buffer_shards: int, skip: int) -> _Plan:
    """Every group's shards and output positions, from row counts alone (no data read, no row held).

    Group g's permutation is `randperm(n_carry + n_own)`, drawn from `gen` right after group g-1's, so it is
    not kept: the reader redraws it from the generator state saved before the first group it reads.
    Output positions grow with the group, and a row carried out of group g passes through later groups until
    it is yielded, so the groups to read are a suffix, from the first group any of whose own rows is yielded
    at or after `skip`: the smallest origin among the rows at or after `skip`. Rows before `skip` are all in
    the groups up to the one holding position `skip`, and rows after it come from there or later, so the
    permutations are drawn only up to that group, tracking the group of origin of the carried rows alone
    (fewer than `batch_size`), with the generator states of the groups they come from.
    """
    order = torch.randperm(len(counts), generator=gen).tolist()
    groups: list[_Group] = []
    carry_origin = torch.empty(0, dtype=torch.int64)  # group of origin of each carried row
    states: dict[int, torch.Tensor] = {}  # generator state before each permutation a carried row comes from
    first: int | None = None
    out = n_carry = 0
    for start in range(0, len(order), buffer_shards):
        shards = [s for s in order[start : start + buffer_shards] if counts[s]]
        if not shards and not groups:
            continue  # nothing selected yet: no permutation is drawn
        g = len(groups)
        n_own = sum(counts[s] for s in shards)
        full = (n_carry + n_own) // batch_size * batch_size
        groups.append(_Group(shards, n_own, n_carry, out, full))
        if first is None:
            states[g] = gen.get_state()
            perm = torch.randperm(n_carry + n_own, generator=gen)
            origin = torch.cat([carry_origin, torch.full((n_own,), g, dtype=torch.int64)])[perm]
            if skip < out + full:  # the group holding output position `skip`
                first = int(origin[skip - out :].min())
            carry_origin = origin[full:]
            live = set(carry_origin.tolist())
            states = {k: v for k, v in states.items() if k in live or k == first}
        out += full
        n_carry = n_carry + n_own - full
    if first is None:  # `skip` falls in the final short batch, or past the epoch's end
        first = int(carry_origin[skip - out :].min()) if skip - out < carry_origin.numel() else len(groups)
    return _Plan(groups, first, states.get(first))


def _groups(
    plan: _Plan,
    selection: RowSelection,
    read: ShardReader,
    limit: int | None,
    pin_memory: bool,
    check: ShardCheck | None,
) -> Iterator[tuple[_Group, torch.Tensor, torch.Tensor]]:
    """Per group to read: its shuffled activations and rows, carry included, up to the group that starts at
    or after `limit`. The rows carried into the first group read all come before `skip` and are never
    yielded: they stand in as zeros (row -1)."""
    if plan.state is None:
        return
    gen = torch.Generator()
    gen.set_state(plan.state)
    T = selection.shard_tokens
    carry_acts: torch.Tensor | None = None
    carry_rows = torch.full((plan.groups[plan.first].n_carry,), -1, dtype=torch.int64)
    for group in plan.groups[plan.first :]:
        if limit is not None and group.out_start >= limit:
            return
        n = group.n_carry + group.n_own
        perm = torch.randperm(n, generator=gen)
        own = [selection.shard(s) for s in group.shards]
        rows = torch.cat([carry_rows, *own])[perm]
        # each row goes straight to its shuffled place (inv[j]: where source row j lands), one gather from
        # the shard and one scatter per row, into pinned memory when asked: no concatenated copy in between
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(n)
        acts: torch.Tensor | None = None
        at = group.n_carry
        for s, selected in zip(group.shards, own):
            part = read(s)[selected - s * T]
            if check is not None:
                check(s, part)
            if acts is None:
                acts = torch.empty(n, part.shape[1], dtype=part.dtype, pin_memory=pin_memory)
            acts.index_copy_(0, inv[at : at + part.shape[0]], part)
            at += part.shape[0]
        if acts is None:  # a group of carried rows alone
            acts = torch.empty(n, carry_acts.shape[1], dtype=carry_acts.dtype, pin_memory=pin_memory)
        if carry_acts is None:  # carried in from groups not read: all before `skip`, never yielded
            acts.index_fill_(0, inv[: group.n_carry], 0)
        else:
            acts.index_copy_(0, inv[: group.n_carry], carry_acts)
        carry_rows, carry_acts = rows[group.n_full :], acts[group.n_full :]
        yield group, acts, rows


def reader_threads() -> int:
    """Intra-op threads of the background reader: half the caller's, at least one."""
    return max(1, torch.get_num_threads() // READER_SHARE)


READER_SHARE = 2


def _prefetched(items: Iterator, threads: int | None = None) -> Iterator:
    """`items`, each produced in a daemon thread while the previous one is consumed (never two ahead, so
    memory holds two groups); an error there is raised here, in order. `threads`: the reader's intra-op
    threads (None: `reader_threads()`)."""
    q: queue.Queue = queue.Queue()
    wanted = threading.Semaphore(1)  # released when the consumer takes an item: then make the next
    stop = threading.Event()

    threads = reader_threads() if threads is None else threads

    def produce() -> None:
        # torch's intra-op thread count is per thread: the reader's copies get a share of the cores, so they
        # do not start a second full team of threads competing with the training step on every core
        torch.set_num_threads(threads)
        try:
            while True:
                while not wanted.acquire(timeout=0.1):
                    if stop.is_set():
                        return
                if stop.is_set():
                    return
                item = next(items, _END)
                q.put(("item", item))
                if item is _END:
                    return
        except BaseException as err:  # handed to the consumer, which re-raises it
            q.put(("error", err))

    thread = threading.Thread(target=produce, name="shard-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            kind, item = q.get()
            if kind == "error":
                raise item
            if item is _END:
                return
            wanted.release()
            yield item
    finally:
        # wait for an item still being made (a forward pass, a read): a daemon thread left inside torch when
        # the interpreter exits aborts the process
        stop.set()
        thread.join()


_END = object()


def stream_batches(
    read: ShardReader,
    selection: RowSelection,
    *,
    batch_size: int,
    seed: int,
    epoch: int = 0,
    buffer_shards: int = 4,
    skip: int = 0,
    limit: int | None = None,
    prefetch: bool = True,
    pin_memory: bool = False,
    check: ShardCheck | None = None,
    full_threads: bool = False,
) -> Iterator[StreamBatch]:
    """Batches of `batch_size` of the selected rows (the last one may be smaller), shuffled across shards
    and sequences.

    `read(s)` returns shard `s` [rows, d_in] (every shard but the last holds `selection.shard_tokens` rows).
    With `skip`, the epoch's first `skip` rows are left out (the first batch may then be short) and groups
    that hold none of the rest are not read; with `limit`, no group is read whose rows all come at or after
    output row `limit` (the batches may then end early): a run that stops mid-epoch reads nothing ahead.
    `check(s, acts)`, when given, sees the selected rows of each shard as it is read (in the reader thread).
    The reader thread gets a share of the intra-op threads for its copies (`reader_threads`); with
    `full_threads` (a reader that runs the model's forward passes, the bulk of a streamed step) it keeps all.
    """
    if batch_size < 1 or buffer_shards < 1:
        raise ValueError(f"batch_size ({batch_size}) and buffer_shards ({buffer_shards}) must be at least 1")
    # one generator per (seed, epoch): epochs differ, reruns agree
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    plan = _plan(selection.counts.tolist(), batch_size, gen, buffer_shards, skip)
    groups = _groups(plan, selection, read, limit, pin_memory and torch.cuda.is_available(), check)
    if prefetch:
        groups = _prefetched(groups, torch.get_num_threads() if full_threads else None)
    for group, acts, rows in groups:
        tail = group is plan.groups[-1]  # the last group yields its carried rows as the final short batch
        end = acts.shape[0] if tail else group.n_full
        for b in range(max(0, skip - group.out_start) // batch_size * batch_size, end, batch_size):
            lo = max(b, skip - group.out_start)
            if lo < min(b + batch_size, end):
                yield StreamBatch(acts[lo : min(b + batch_size, end)], rows[lo : min(b + batch_size, end)])
