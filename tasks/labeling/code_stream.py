"""A dictionary's firing codes over a stream of activation batches, as sparse batches, encoded only once.

Every labeling pass (top-k, window activations, histograms, quantile samples, silent rows, co-occurrence)
reads the same codes. Encoding costs a `[batch, d_in] @ [d_in, d_sae]` matmul per batch and dense
`[batch, d_sae]` temporaries, while the firing codes of a sparse dictionary are a few per token. So the first
pass encodes and writes each batch's firing codes (local row, latent, value; 12 bytes each) to a temporary
folder, and later passes read them back: one encode instead of one per pass, and every later step costs
O(firing codes) instead of O(rows x d_sae). The codes stay on the device the dictionary encodes on (the
model's, a GPU at scale), so every pass over them runs there; the first `resident_budget` bytes of them
(default 1 GiB on an accelerator, 64 MiB on the CPU) stay in that device's memory, and only the rest take the
round trip through disk (written from the host, read back to the device). Memory stays at one batch plus that
budget; disk holds the rest. If they would pass
`spill_budget` bytes (a dense dictionary), the spill is dropped and every pass encodes again.

`encode_threads`: the intra-op threads that read and encode a batch, when the caller runs its own work on
fewer (`intra_op_threads`, see `tasks.common.threads`): the passes' per-batch bookkeeping works on tensors of
a few hundred thousand entries at most, and the encode's matmul is large enough to want the whole team.

`smallest_per_group` is the one selection primitive the passes share: within each group (a latent, or a
latent's quantile bin), keep the entries with the k smallest scores, merging a running selection with a batch.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from featureatlas.tasks.common.threads import intra_op_threads
from featureatlas.tasks.labeling.codes import firing_codes
from featureatlas.tasks.labeling.sharded import release_freed_memory

log = logging.getLogger(__name__)

__all__ = ["CodeStream", "SparseBatch", "kth_per_group", "lookup", "smallest_per_group"]


class SparseBatch(NamedTuple):
    """The firing codes of rows start..start+n, sorted by row then latent (on the encoding device)."""

    start: int
    n: int
    rows: Tensor  # [nnz] int64, global row index
    latents: Tensor  # [nnz] int64
    values: Tensor  # [nnz] float32, > 0


class CodeStream:
    """Iterating gives `SparseBatch`es of `dictionary`'s firing codes over `batches()` (fresh each call).

    `n_rows` is known after the first full pass. Call `close()` (or use `with`) to remove the spill folder.
    """

    def __init__(
        self,
        dictionary: nn.Module,
        batches: Callable[[], Iterable[Tensor]],
        *,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        spill_budget: int = 8 << 30,
        resident_budget: int | None = None,
        spill_dir: str | Path | None = None,
        encode_threads: int | None = None,
    ):
        self.dictionary, self.batches = dictionary, batches
        self.encode_threads = encode_threads
        self.device, self.dtype = device, dtype
        self.d_sae: int = dictionary.d_sae
        self.spill_budget, self.resident_budget = spill_budget, resident_budget
        self._spill_parent = spill_dir
        self._folder: Path | None = None
        # (start, n, file or resident (rows, latents, values)) once a pass completed
        self._files: list[tuple[int, int, Path | tuple[Tensor, Tensor, Tensor]]] | None = None
        self._device: torch.device | None = None
        self.n_rows: int | None = None
        self.encode_passes = 0

    def __enter__(self) -> CodeStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None
        self._files = None

    def __iter__(self) -> Iterator[SparseBatch]:
        if self._files is not None:
            read = False
            for start, n, kept in self._files:
                if isinstance(kept, Path):
                    t = load_file(str(kept), device=str(self._device))
                    kept, read = (t["rows"], t["latents"], t["values"]), True
                rows, latents, values = kept
                yield SparseBatch(start, n, rows.long() + start, latents.long(), values)
            if read:  # a pass over resident codes frees only per-batch copies, which the next pass reuses
                release_freed_memory()
            return
        yield from self._encode_pass()

    def _resident_budget(self, device: torch.device) -> int:
        """Bytes of firing codes kept in memory: `resident_budget`, else 1 GiB on an accelerator and 64 MiB
        in host memory, where the spilled files are served from the page cache anyway and a budget that
        grows the process with the corpus up to a GiB would show as memory growing with tokens."""
        if self.resident_budget is not None:
            return self.resident_budget
        return 1 << 30 if device.type != "cpu" else 64 << 20

    @torch.no_grad()
    def _encode(self, acts: Tensor, start: int) -> SparseBatch:
        x = acts.to(device=self.device or acts.device, dtype=self.dtype or acts.dtype)
        codes = firing_codes(self.dictionary, x)
        self._device = codes.device
        r, lat = (codes > 0).nonzero(as_tuple=True)  # row-major: sorted by row, then latent
        return SparseBatch(start, acts.shape[0], r + start, lat, codes[r, lat])

    def _encode_pass(self) -> Iterator[SparseBatch]:
        self.encode_passes += 1
        spill = self.encode_passes == 1 and self.spill_budget > 0
        if spill:
            self._folder = Path(tempfile.mkdtemp(prefix="featureatlas-codes-", dir=self._spill_parent))
        files, size, start = [], 0, 0
        resident = 0
        try:
            source = iter(self.batches())
            while True:
                with intra_op_threads(self.encode_threads):  # reading and encoding: the whole team
                    acts = next(source, None)
                    if acts is None:
                        break
                    batch = self._encode(acts, start)
                if spill:
                    size += 12 * len(batch.values)
                    if size > self.spill_budget:
                        log.info("firing codes pass %d bytes: re-encoding on every pass", self.spill_budget)
                        shutil.rmtree(self._folder, ignore_errors=True)
                        self._folder, spill, files = None, False, []
                    else:
                        kept = ((batch.rows - start).int(), batch.latents.int(), batch.values.contiguous())
                        resident += 12 * len(batch.values)
                        if resident > self._resident_budget(batch.values.device):
                            path = self._folder / f"{len(files):06d}.safetensors"
                            names = ("rows", "latents", "values")
                            save_file({k: t.cpu() for k, t in zip(names, kept)}, str(path))
                            kept = path
                        files.append((start, batch.n, kept))
                start += batch.n
                yield batch
        except BaseException:
            self.close()
            raise
        self.n_rows = start
        release_freed_memory()
        if spill:
            self._files = files


def smallest_per_group(group: Tensor, score: Tensor, k: int) -> Tensor:
    """Indices of the entries with the k smallest `score`s within each `group`, ties to the earlier entry;
    ordered by group, then score."""
    if score.dtype == torch.float32 and (len(group) == 0 or int(group.max()) < 1 << 31):
        # one stable sort of (group, score) packed in an int64: the float's bits made order-preserving
        # (negative floats: every bit flipped; others: the sign bit set), the group above them
        bits = score.contiguous().view(torch.int32).to(torch.int64)
        sortable = torch.where(bits < 0, ~bits & 0xFFFFFFFF, bits | 0x80000000)
        order = torch.argsort(group * (1 << 32) + sortable, stable=True)
    else:
        order = torch.argsort(score, stable=True)
        order = order[torch.argsort(group[order], stable=True)]
    g = group[order]
    rank = torch.arange(len(g), device=g.device) - torch.searchsorted(g, g)  # g sorted: each group's start
    return order[rank < k]


def kth_per_group(group: Tensor, score: Tensor, k: int, n_groups: int, empty: float) -> Tensor:
    """[n_groups] the k-th smallest score of each group in a `smallest_per_group` selection (ordered by
    group, then score); `empty` where a group holds fewer than k. A new entry enters a full group only below
    it."""
    out = torch.full((n_groups,), empty, device=score.device, dtype=score.dtype)
    rank = torch.arange(len(group), device=group.device) - torch.searchsorted(group, group)
    last = rank == k - 1
    out[group[last]] = score[last]
    return out


def lookup(batch: SparseBatch, d_sae: int, rows: Tensor, latents: Tensor) -> Tensor:
    """The code at each (row, latent) of this batch's rows (0 where it does not fire)."""
    keys = (batch.rows - batch.start) * d_sae + batch.latents  # sorted: rows, then latents
    want = (rows - batch.start) * d_sae + latents
    if len(keys) == 0:
        return torch.zeros(len(want), device=want.device)
    at = torch.searchsorted(keys, want).clamp_max(len(keys) - 1)
    return torch.where(keys[at] == want, batch.values[at], torch.zeros((), device=want.device))
