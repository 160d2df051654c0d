"""The activations of an unstored cache (`cache.store: false`), recomputed from the model shard by shard.

An unstored cache keeps the token table and the contexts, not the activations. Shard s is the same rows
[s*T, (s+1)*T) a stored cache would hold, computed by the same forward passes: batches of `batch_size`
contexts aligned at multiples of `batch_size` from context 0, exactly as the cache writer cuts them, so a
recomputed shard holds the bytes the stored one would (on a deterministic device) and training, evaluation
and labeling cannot tell the two apart. A batch straddling two shards runs once for each; the price is at most
one batch per shard.

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
from typing import TYPE_CHECKING

import torch
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
        input_ids: Tensor,
        attention_mask: Tensor,
        hookpoints: list[str],
        *,
        dtype: str,
        shard_tokens: int,
        batch_size: int,
        keep: int = 2,
        hold_rows: int = 1 << 16,
    ) -> None:
        self.loaded, self.hookpoints = loaded, hookpoints
        self.ids, self.mask = input_ids, attention_mask
        self.row_end = attention_mask.sum(1).cumsum(0)  # row_end[c]: rows before context c + 1
        self.n_rows = int(self.row_end[-1]) if len(self.row_end) else 0
        self.dtype, self.T, self.bs, self.keep = DTYPES[dtype], shard_tokens, batch_size, keep
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
        contexts = cache.contexts()
        return cls(
            loaded,
            contexts["input_ids"],
            contexts["attention_mask"],
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
        first = int(torch.searchsorted(self.row_end, lo, right=True)) // self.bs * self.bs
        last = int(torch.searchsorted(self.row_end, hi - 1, right=True)) // self.bs * self.bs
        parts: dict[str, list[Tensor]] = {hp: [] for hp in self.hookpoints}
        for start in range(first, last + 1, self.bs):
            mask = self.mask[start : start + self.bs].to(device)
            with torch.inference_mode():
                acts = capture_activations(
                    model, self.hookpoints, self.ids[start : start + self.bs].to(device), mask
                )
            batch_row = int(self.row_end[start - 1]) if start else 0
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
