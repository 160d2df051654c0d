"""Shuffled training batches from an activation cache larger than memory.

Rows of one context sit next to each other in a shard, and a context's tokens are strongly correlated, so
batches must mix sequences and shards, not just shuffle within one. Each epoch draws a seeded permutation of
the shards; they are read `buffer_shards` at a time, the selected rows of the group are shuffled together
(with the few rows left over from the previous group) and cut into batches. Every selected row is yielded
exactly once per epoch; the same (seed, epoch) gives the same batches.

The order depends on row numbers alone, never on the data, so it is planned from the row indices first
(`_plan`): a run resumed at output row `skip` reads (or, for a cache recomputed from the model, runs the
forward passes of) only the groups holding rows at or after `skip`, and yields exactly the batches an
uninterrupted epoch yields from there on. A background thread reads the next group while the current one is
consumed (`prefetch`), and can place it in pinned memory (`pin_memory`), so a host-to-GPU copy with
`non_blocking=True` overlaps the training step. Memory holds at most two groups plus the carried rows.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch

from featureatlas.tasks.common.store import StreamBatch

ShardReader = Callable[[int], torch.Tensor]


class _Group(NamedTuple):
    shards: list[int]
    own_rows: list[torch.Tensor]  # selected rows of each shard, in shard order
    perm: torch.Tensor  # permutation of (carried rows, own rows)
    n_carry: int  # rows carried in from the previous group
    out_start: int  # output position of the group's first yielded row
    n_full: int  # rows yielded as full batches; the rest are carried on
    needed: bool  # some row of the group is yielded at or after `skip`


def _by_shard(rows: torch.Tensor, shard_tokens: int, n_shards: int) -> list[torch.Tensor]:
    """The rows of each shard, in their order in `rows`: one stable sort, not a mask per shard."""
    shard_of = rows // shard_tokens
    order = torch.argsort(shard_of, stable=True)
    bounds = torch.searchsorted(shard_of[order], torch.arange(n_shards + 1)).tolist()
    return [rows[order[bounds[s] : bounds[s + 1]]] for s in range(n_shards)]


def _plan(
    per_shard: list[torch.Tensor],
    batch_size: int,
    gen: torch.Generator,
    buffer_shards: int,
    skip: int,
    limit: int | None,
) -> list[_Group]:
    """Every group's shards, permutation and output positions, from row counts alone (no data read).

    Output positions grow with the group, and a row carried out of group g passes through every group
    until it is yielded, so the groups to read are a suffix: from the first group any of whose own rows is
    yielded at or after `skip`. Rows carried into that group from earlier ones are all yielded before `skip`.
    With `limit`, the groups whose output starts at or after it are not read either.
    """
    order = torch.randperm(len(per_shard), generator=gen).tolist()
    groups: list[dict] = []
    carry_origin: torch.Tensor | None = None  # None until the first group with rows
    last_out: list[int] = []  # per group: the last output position of any of its own rows
    out = 0

    def note(origin: torch.Tensor, first: int) -> None:
        for k in torch.unique(origin).tolist():
            last_out[k] = max(last_out[k], first + int((origin == k).nonzero().max()))

    for start in range(0, len(order), buffer_shards):
        shards = [s for s in order[start : start + buffer_shards] if per_shard[s].numel()]
        if not shards and carry_origin is None:
            continue  # nothing selected yet: no permutation is drawn
        g = len(groups)
        own = [per_shard[s] for s in shards]
        n_own = sum(r.numel() for r in own)
        carried = carry_origin if carry_origin is not None else torch.empty(0, dtype=torch.int64)
        origin = torch.cat([carried, torch.full((n_own,), g, dtype=torch.int64)])
        perm = torch.randperm(origin.numel(), generator=gen)
        origin = origin[perm]
        full = origin.numel() // batch_size * batch_size
        last_out.append(-1)
        note(origin[:full], out)
        groups.append(
            {"shards": shards, "own": own, "perm": perm, "n_carry": carried.numel(), "out_start": out}
        )
        groups[-1]["n_full"] = full
        out += full
        carry_origin = origin[full:]
    if carry_origin is not None:
        note(carry_origin, out)  # the final short batch
    first = next((g for g, last in enumerate(last_out) if last >= skip), len(groups))
    fields = ("shards", "own", "perm", "n_carry", "out_start", "n_full")
    return [
        _Group(*(d[k] for k in fields), g >= first and (limit is None or d["out_start"] < limit))
        for g, d in enumerate(groups)
    ]


def _groups(
    plan: list[_Group], read: ShardReader, shard_tokens: int, pin_memory: bool
) -> Iterator[tuple[_Group, torch.Tensor | None, torch.Tensor]]:
    """Per group: its shuffled activations (None when not needed) and shuffled rows, carry included."""
    carry_acts: torch.Tensor | None = None
    carry_rows = torch.empty(0, dtype=torch.int64)
    for group in plan:
        rows = torch.cat([carry_rows, *group.own_rows])[group.perm]
        acts = None
        if group.needed:
            parts = [] if carry_acts is None else [carry_acts]
            for s, selected in zip(group.shards, group.own_rows):
                parts.append(read(s)[selected - s * shard_tokens])
            if carry_acts is None and group.n_carry:  # carried rows of unread groups: all before `skip`
                parts.insert(0, parts[0].new_zeros(group.n_carry, parts[0].shape[1]))
            acts = torch.cat(parts)[group.perm]
            if pin_memory:
                acts = acts.pin_memory()
        carry_rows = rows[group.n_full :]
        carry_acts = None if acts is None else acts[group.n_full :]
        yield group, acts, rows


def _prefetched(items: Iterator) -> Iterator:
    """`items`, each produced in a daemon thread while the previous one is consumed (never two ahead, so
    memory holds two groups); an error there is raised here, in order."""
    q: queue.Queue = queue.Queue()
    wanted = threading.Semaphore(1)  # released when the consumer takes an item: then make the next
    stop = threading.Event()

    def produce() -> None:
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
    n_shards: int,
    shard_tokens: int,
    rows: torch.Tensor,
    *,
    batch_size: int,
    seed: int,
    epoch: int = 0,
    buffer_shards: int = 4,
    skip: int = 0,
    limit: int | None = None,
    prefetch: bool = True,
    pin_memory: bool = False,
) -> Iterator[StreamBatch]:
    """Batches of `batch_size` rows (the last one may be smaller), shuffled across shards and sequences.

    `read(s)` returns shard `s` [rows, d_in] (every shard but the last holds `shard_tokens` rows). With
    `skip`, the epoch's first `skip` rows are left out (the first batch may then be short) and groups that
    hold none of the rest are not read; with `limit`, no group is read whose rows all come at or after
    output row `limit` (the batches may then end early): a run that stops mid-epoch reads nothing ahead.
    """
    if batch_size < 1 or buffer_shards < 1:
        raise ValueError(f"batch_size ({batch_size}) and buffer_shards ({buffer_shards}) must be at least 1")
    # one generator per (seed, epoch): epochs differ, reruns agree
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    per_shard = _by_shard(rows.to(torch.int64), shard_tokens, n_shards)
    plan = _plan(per_shard, batch_size, gen, buffer_shards, skip, limit)
    groups = _groups(plan, read, shard_tokens, pin_memory and torch.cuda.is_available())
    if prefetch:
        groups = _prefetched(groups)
    acts = rows_out = None
    last: _Group | None = None
    for group, acts, rows_out in groups:
        last = group
        if acts is None:
            if limit is not None and group.out_start >= limit:
                return
            continue
        for b in range(max(0, skip - group.out_start) // batch_size * batch_size, group.n_full, batch_size):
            lo = max(b, skip - group.out_start)
            yield StreamBatch(acts[lo : b + batch_size], rows_out[lo : b + batch_size])
    if last is not None and acts is not None and rows_out is not None:
        lo = max(last.n_full, skip - last.out_start)
        if lo < rows_out.numel():
            yield StreamBatch(acts[lo:], rows_out[lo:])
