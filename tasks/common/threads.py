"""torch's intra-op threads for work that runs beside, or between, the large kernels.

torch's intra-op thread count is per thread, and each thread that calls a parallel op starts a team of its
own. Small ops (a sort of a few hundred thousand entries, a shard's statistics, a table's columns, a tiny
net's step) gain little from a team and lose much when one is kept waiting: on a loaded or shared machine a
team waiting for a descheduled member makes a millisecond op take a hundred, and a side thread left at the
default adds a second full team that spin-waits on the cores the model's forward passes hold. On 2 cores the
token table's few torch ops took 6x the CPU with a team of two (0.98 s for 409,600 rows, against 0.17 s on one
thread). So such work runs on one thread, in a side pool or inside `intra_op_threads`, and the large kernels
(the forward pass, the encode's matmul) keep the caller's team.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch


@contextmanager
def intra_op_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op threads of the calling thread set to `n` (None: left as they are) for the block,
    the caller's restored after."""
    before = torch.get_num_threads()
    if n is None or n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def side_pool(name: str) -> ThreadPoolExecutor:
    """One worker thread for work beside the forward passes (writing, hashing, statistics, the token table),
    whose torch ops run on one intra-op thread."""
    return ThreadPoolExecutor(
        max_workers=1, thread_name_prefix=name, initializer=torch.set_num_threads, initargs=(1,)
    )
