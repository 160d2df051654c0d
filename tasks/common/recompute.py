"""The activations of an unstored cache (`cache.store: false`), recomputed from the model shard by shard.

An unstored cache keeps the token table and the contexts, not the activations. Shard s is the same rows
[s*T, (s+1)*T) a stored cache would hold, computed by the same forward passes: batches of `batch_size`
contexts aligned at multiples of `batch_size` from context 0, exactly as the cache writer cuts them, so a
recomputed shard holds the bytes the stored one would (on a deterministic device) and training, evaluation
and labeling cannot tell the two apart. A batch straddling two shards runs once for each; the price is at most
one batch per shard. The contexts stay in contexts.safetensors: a shard reads the slices of its own batches
when it is computed, and memory keeps one row offset per batch of contexts, not the token ids.

Every hookpoint of the cache comes from the same pass, and the last `keep` shards are kept, so dictionaries
of several hookpoints reading the same shard share its forward passes. The first shards read are also held
until they are read a second time, up to `hold_rows` rows: a trainer first reads a data sample (input scale,
`b_dec`) of whole shards, then the epoch reads those shards again, and without the hold each of them would
run its forward passes twice. Memory stays bounded by `keep` shards plus `hold_rows` rows. Each shard computed
for the first time adds to the float64 statistics of what was seen (`seen`), summed on the model's device.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from torch import Tensor

from featureatlas.tasks.common.hooks import capture_activations
from featureatlas.tasks.common.models import DTYPES, LoadedModel
from featureatlas.tasks.common.shards import shard_statistics, summarize

if TYPE_CHECKING:
    from featureatlas.tasks.common.store import ActivationCache

log = logging.getLogger(__name__)


class Recompute:
    """Shards of one unstored cache, from `loaded`'s forward passes; safe to call from a reader thread."""

    def __init__(
        self,
        loaded: LoadedModel,
        contexts: Path,
        hookpoints: list[str],
        *,
        dtype: str,
        shard_tokens: int,
        batch_size: int,
        keep: int = 2,
        hold_rows: int = 1 << 16,
    ) -> None:
        self.loaded, self.hookpoints, self.contexts = loaded, hookpoints, contexts
        self.dtype, self.T, self.bs, self.keep = DTYPES[dtype], shard_tokens, batch_size, keep
        # batch_row[j]: rows before context j * batch_size; the contexts themselves stay on disk
        self.batch_row = _batch_rows(contexts, batch_size)
        self.n_rows = int(self.batch_row[-1])
        self._shards: OrderedDict[int, dict[str, Tensor]] = OrderedDict()
        # shards read once so far, held for their second read while they fit in hold_rows
        self.hold = max(0, -(-hold_rows // shard_tokens)) if hold_rows else 0
        self._held: dict[int, tuple[dict[str, Tensor], set[str]]] = {}  # shard, hookpoints that read it
        self._held_ever: set[int] = set()
        self._done: set[int] = set()
        self._lock = threading.Lock()
        self._sums: dict[str, list] = {}
        self.forward_tokens = 0  # real tokens run through the model, boundary batches counted twice

    @classmethod
    def from_cache(cls, cache: ActivationCache, loaded: LoadedModel | None = None) -> Recompute:
        """The recompute of `cache`, with `loaded` or the model its manifest names (loaded once a process)."""
        m = cache.manifest
        if loaded is None:
            from featureatlas.schemas.spec import ModelSpec
            from featureatlas.tasks.common.models import load_model_ref

            how = m.get("model_load")
            if how is None:
                raise ValueError(
                    f"{cache.folder} stores no activations and names no model to recompute them with; "
                    "call ActivationCache.attach_model(loaded) first"
                )
            spec = ModelSpec.model_validate(how["spec"])
            loaded = load_model_ref(how["source"], spec, how["path"], how["converted"])
        return cls(
            loaded,
            cache.folder / "contexts.safetensors",
            list(m["hookpoints"]),
            dtype=m["dtype"],
            shard_tokens=int(m["shard_tokens"]),
            batch_size=int(m["batch_size"]),
        )

    def shard(self, hookpoint: str, index: int) -> Tensor:
        """Rows [index*T, (index+1)*T) of `hookpoint` [rows, d_in], on the CPU in the cache's dtype."""
        if hookpoint not in self.hookpoints:
            raise ValueError(f"hookpoint {hookpoint!r} is not in this cache; cached: {self.hookpoints}")
        with self._lock:
            held = self._held.get(index)
            if held is not None:
                if hookpoint in held[1]:  # its second read: the hold is released
                    del self._held[index]
                held[1].add(hookpoint)
                self._shards[index] = held[0]
            elif index not in self._shards:
                self._shards[index] = self._compute(index)
                if len(self._held_ever) < self.hold and index not in self._held_ever:
                    self._held_ever.add(index)
                    self._held[index] = (self._shards[index], {hookpoint})
            self._shards.move_to_end(index)
            while len(self._shards) > self.keep:
                self._shards.popitem(last=False)
            return self._shards[index][hookpoint]

    def _compute(self, index: int) -> dict[str, Tensor]:
        lo, hi = index * self.T, min((index + 1) * self.T, self.n_rows)
        if not 0 <= lo < hi:
            raise IndexError(f"shard {index} is out of range: the cache has {self.n_rows} rows")
        model, _, device = self.loaded
        # the batches holding rows lo and hi - 1: the last batch starting at or before each
        first = int(torch.searchsorted(self.batch_row, lo, right=True)) - 1
        last = int(torch.searchsorted(self.batch_row, hi - 1, right=True)) - 1
        parts: dict[str, list[Tensor]] = {hp: [] for hp in self.hookpoints}
        with safe_open(str(self.contexts), framework="pt") as f:  # only this shard's contexts are read
            ids_file, mask_file = f.get_slice("input_ids"), f.get_slice("attention_mask")
            for batch in range(first, last + 1):
                start = batch * self.bs
                ids, mask = ids_file[start : start + self.bs], mask_file[start : start + self.bs].to(device)
                with torch.inference_mode():
                    acts = capture_activations(model, self.hookpoints, ids.to(device), mask)
                batch_row = int(self.batch_row[batch])
                a, b = max(lo - batch_row, 0), hi - batch_row
                keep = mask.bool()
                self.forward_tokens += int(keep.sum())
                for hp in self.hookpoints:
                    parts[hp].append(acts[hp][keep][a:b].to(self.dtype))
        out = {hp: torch.cat(p) for hp, p in parts.items()}
        if index not in self._done:
            self._done.add(index)
            for hp, shard in out.items():
                on = shard if shard.device.type in ("cpu", "cuda") else shard.cpu()  # float64 needed
                total, total_sq, norm_sum = shard_statistics(on)
                sums = self._sums.setdefault(hp, [0, 0, 0.0, 0])
                sums[0], sums[1] = sums[0] + total, sums[1] + total_sq
                sums[2], sums[3] = sums[2] + norm_sum, sums[3] + shard.shape[0]
        return {hp: shard.cpu() for hp, shard in out.items()}

    def seen(self, hookpoint: str) -> dict:
        """Rows and float64 statistics (mean, rms, total_variance, ...) of the shards computed so far."""
        sums = self._sums.get(hookpoint)
        if sums is None:
            return {"rows": 0, "shards": 0}
        return {"rows": sums[3], "shards": len(self._done), **summarize(*sums)}


def _batch_rows(contexts: Path, batch_size: int, chunk: int = 1 << 12) -> Tensor:
    """Rows before context j * batch_size, for every batch j and the end [n_batches + 1], int64: the
    attention mask summed a chunk of whole batches at a time, never loaded whole."""
    step = batch_size * max(1, chunk // batch_size)
    per_batch = [torch.zeros(1, dtype=torch.int64)]
    with safe_open(str(contexts), framework="pt") as f:
        mask = f.get_slice("attention_mask")
        for a in range(0, mask.get_shape()[0], step):
            lengths = mask[a : a + step].to(torch.int64).sum(1)
            per_batch.append(
                torch.nn.functional.pad(lengths, (0, -len(lengths) % batch_size)).view(-1, batch_size).sum(1)
            )
    return torch.cat(per_batch).cumsum(0)
