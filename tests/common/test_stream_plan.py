"""The streaming reader's plan holds counts and generator states, not rows, and yields exactly the batches of
the earlier plan that held every row's permutation (kept below as the reference), for any skip and limit."""

from __future__ import annotations

import pytest
import torch

from featureatlas.tasks.common.selection import RowSelection
from featureatlas.tasks.common.stream import _plan, stream_batches

T, N_SHARDS, D = 50, 13, 3


def _read(s: int) -> torch.Tensor:
    """Shard s [T, D]: column 0 holds the row number, so every batch's activations can be checked."""
    rows = torch.arange(s * T, (s + 1) * T, dtype=torch.float64)
    return torch.stack([rows, -rows, rows * 0.5], dim=1)


def _selection() -> torch.Tensor:
    """Rows of 13 shards with uneven counts: two shards empty (one of them first in many orders), one full."""
    gen = torch.Generator().manual_seed(7)
    keep = torch.rand(N_SHARDS * T, generator=gen) < 0.7
    keep[2 * T : 3 * T] = False
    keep[9 * T : 10 * T] = False
    keep[5 * T : 6 * T] = True
    return keep.nonzero().squeeze(1)


def _reference(rows, batch_size, seed, epoch, buffer_shards, skip, limit):
    """The batches' rows as the plan that held every row's permutation ordered them (its algorithm,
    written out on rows alone: a row's activation is a function of the row)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    shard_of = rows // T
    order_rows = torch.argsort(shard_of, stable=True)
    bounds = torch.searchsorted(shard_of[order_rows], torch.arange(N_SHARDS + 1)).tolist()
    per_shard = [rows[order_rows[bounds[s] : bounds[s + 1]]] for s in range(N_SHARDS)]
    order = torch.randperm(N_SHARDS, generator=gen).tolist()
    out, carry, seq = 0, None, []  # seq: (out_start, n_full, shuffled rows) per group
    for start in range(0, N_SHARDS, buffer_shards):
        shards = [s for s in order[start : start + buffer_shards] if per_shard[s].numel()]
        if not shards and carry is None:
            continue
        carried = carry if carry is not None else torch.empty(0, dtype=torch.int64)
        group = torch.cat([carried, *(per_shard[s] for s in shards)])
        group = group[torch.randperm(group.numel(), generator=gen)]
        full = group.numel() // batch_size * batch_size
        seq.append((out, full, group))
        out += full
        carry = group[full:]
    batches = []
    for g, (start, full, group) in enumerate(seq):
        if limit is not None and start >= limit:
            break
        end = group.numel() if g == len(seq) - 1 else full
        for b in range(0, end, batch_size):
            lo, hi = max(b, skip - start), min(b + batch_size, end)
            if lo < hi:
                batches.append(group[lo:hi])
    return batches


CASES = [  # batch_size, seed, epoch, buffer_shards, skip, limit
    (32, 0, 0, 4, 0, None),
    (32, 3, 1, 4, 0, None),
    (7, 1, 0, 2, 0, None),
    (7, 1, 0, 2, 100, None),
    (64, 5, 2, 3, 130, 200),
    (500, 2, 0, 1, 0, None),  # batches larger than a group: rows carried across several groups
    (500, 2, 0, 1, 260, None),
    (500, 2, 0, 1, 401, 900),
    (32, 4, 0, 4, 0, 1),
]


@pytest.mark.parametrize(("batch_size", "seed", "epoch", "buffer_shards", "skip", "limit"), CASES)
def test_batches_equal_the_row_holding_plan(batch_size, seed, epoch, buffer_shards, skip, limit):
    rows = _selection()
    selection = RowSelection.from_rows(rows, T, N_SHARDS)
    want = _reference(rows, batch_size, seed, epoch, buffer_shards, skip, limit)
    got = list(
        stream_batches(
            _read,
            selection,
            batch_size=batch_size,
            seed=seed,
            epoch=epoch,
            buffer_shards=buffer_shards,
            skip=skip,
            limit=limit,
        )
    )
    assert len(got) == len(want)
    for b, w in zip(got, want, strict=True):
        assert torch.equal(b.rows, w)
        assert torch.equal(b.acts[:, 0].long(), w) and torch.equal(b.acts[:, 1], -b.acts[:, 0])


def test_every_skip_resumes_the_uninterrupted_epoch_exactly():
    rows = _selection()
    selection = RowSelection.from_rows(rows, T, N_SHARDS)
    kw = {"batch_size": 40, "seed": 9, "buffer_shards": 2}
    whole = torch.cat([b.rows for b in stream_batches(_read, selection, **kw)])
    assert sorted(whole.tolist()) == sorted(rows.tolist())
    for skip in range(0, whole.numel() + 2, 37):
        got = [b.rows for b in stream_batches(_read, selection, skip=skip, **kw)]
        tail = torch.cat(got) if got else torch.empty(0, dtype=torch.int64)
        assert torch.equal(tail, whole[skip:]), skip


def test_the_plan_holds_no_tensor_of_the_rows():
    """O(groups): shard lists, counts and at most one generator state, however many rows are selected."""
    counts = [100_000] * 40  # 4M rows
    plan = _plan(counts, 4096, torch.Generator().manual_seed(0), 4, skip=1_000_000)
    assert len(plan.groups) == 10 and plan.state is not None
    for group in plan.groups:
        assert all(isinstance(v, int) for v in (group.n_own, group.n_carry, group.out_start, group.n_full))
        assert len(group.shards) == 4
    assert plan.state.numel() < 10_000  # the generator's state, not a permutation of 4M rows
    assert plan.groups[plan.first].out_start <= 1_000_000


def test_a_selection_from_rows_outside_the_shards_is_refused():
    with pytest.raises(ValueError, match=r"must lie in \[0, 650\)"):
        RowSelection.from_rows(torch.tensor([3, 650]), T, N_SHARDS)


@pytest.mark.parametrize("full_threads", [False, True])
def test_the_reader_thread_keeps_every_thread_only_when_it_runs_the_model(full_threads):
    """A cache reader's copies run on a share of the intra-op threads; a reader that recomputes shards from
    the model (`full_threads`) keeps all of them, or its forward passes would run at a fraction of speed."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = []

        def read(s: int) -> torch.Tensor:  # noqa: ARG001
            seen.append(torch.get_num_threads())
            return torch.zeros(8, 3)

        selection = RowSelection.from_rows(torch.arange(16), 8, 2)
        batches = stream_batches(read, selection, batch_size=4, seed=0, full_threads=full_threads)
        assert sum(len(b.rows) for b in batches) == 16
        assert seen and set(seen) == ({2} if full_threads else {1})
        assert torch.get_num_threads() == 2  # the caller's own count is untouched
    finally:
        torch.set_num_threads(before)
