"""The on-disk activation cache: checksummed safetensors shards per hookpoint, a token table, a manifest.

Layout of one cache folder:
    manifest.json                     model, corpus, hookpoints, dtype, d_in, token count, shards + sha256
    tokens.parquet                    one row per cached activation row: row, context, position, token_id,
                                      token, doc_id, split, shard, shard_row
    contexts.safetensors              input_ids and attention_mask of every context [n_ctx, L]
    acts/<hookpoint>/00000.safetensors  tensor "acts" [rows, d_in]

Stages other than caching read caches only through `ActivationCache`, which verifies every shard's checksum;
the shards are written by `shards.ShardWriter`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
from safetensors.torch import load_file

from featureatlas.tasks.common.models import DTYPES
from featureatlas.tasks.common.selection import RowSelection, table_filter, table_head, table_rows
from featureatlas.tasks.common.shards import CacheIntegrityError, check_shard_size, sha256_file

if TYPE_CHECKING:  # polars loads with the token table only: reading shards does not need it
    import polars as pl


FORMAT_VERSION = 2  # 2: token column is_special, per-hookpoint layout, rms and mean_squared_norm


class StreamBatch(NamedTuple):
    acts: torch.Tensor  # [batch, d_in]
    rows: torch.Tensor  # [batch] int64: the rows of the token table they belong to


class ActivationCache:
    """Read access to a finished cache folder; every shard is checked against the manifest on open."""

    def __init__(self, folder: str | Path, verify: bool = True):
        self.folder = Path(folder)
        manifest_path = self.folder / "manifest.json"
        if not manifest_path.is_file():
            raise CacheIntegrityError(
                f"{self.folder} has no manifest.json: it is not a finished activation cache"
            )
        self.manifest = json.loads(manifest_path.read_text())
        # an unstored cache (`cache.store: false`) holds tokens and contexts; its activations come from the
        # model, recomputed shard by shard on demand (`tasks.common.recompute`)
        self.stored = bool(self.manifest.get("stored", True))
        if verify and self.stored:
            self.verify()
        self._tokens: pl.DataFrame | None = None
        self._recompute = None

    @property
    def recompute(self):
        """The model-backed shard reader of an unstored cache (the model loads on first use)."""
        if self.stored:
            raise ValueError(f"{self.folder} stores its activations; read them with read_shard")
        if self._recompute is None:
            from featureatlas.tasks.common.recompute import Recompute

            self._recompute = Recompute.from_cache(self)
        return self._recompute

    def attach_model(self, loaded) -> None:
        """Recompute an unstored cache's activations with `loaded` (a `LoadedModel`) instead of loading it."""
        from featureatlas.tasks.common.recompute import Recompute

        self._recompute = Recompute.from_cache(self, loaded)

    @property
    def shard_tokens(self) -> int:
        """Rows of every shard but the last (a hand-written manifest may leave it out: the first shard's)."""
        if "shard_tokens" in self.manifest:
            return int(self.manifest["shard_tokens"])
        shards = next(iter(self.manifest["hookpoints"].values()), {}).get("shards") or [{"rows": 1}]
        return int(shards[0]["rows"])

    def n_shards(self, hookpoint: str) -> int:
        return len(self._info(hookpoint)["shards"])

    @property
    def hookpoints(self) -> list[str]:
        return list(self.manifest["hookpoints"])

    def verify(self) -> None:
        for hp, info in self.manifest["hookpoints"].items():
            for shard in info["shards"]:
                path = check_shard_size(self.folder, hp, shard)
                if sha256_file(path) != shard["sha256"]:
                    raise CacheIntegrityError(
                        f"shard {path} of hookpoint {hp!r} is corrupt (checksum mismatch); "
                        "delete the cache folder and run the pipeline again"
                    )

    @property
    def tokens(self) -> pl.DataFrame:
        if self._tokens is None:
            import polars as pl

            self._tokens = pl.read_parquet(self.folder / "tokens.parquet")
        return self._tokens

    def contexts(self) -> dict[str, torch.Tensor]:
        return load_file(str(self.folder / "contexts.safetensors"))

    def _filters(
        self, exclude_first_token: bool | None, exclude_special_tokens: bool | None
    ) -> tuple[bool, bool]:
        """The cache's own settings where the caller passes None; special tokens only where the table has
        the column (format 1 had none)."""
        if exclude_first_token is None:
            exclude_first_token = self.manifest["exclude_first_token"]
        if exclude_special_tokens is None:
            exclude_special_tokens = self.manifest.get("exclude_special_tokens", False)
        if exclude_special_tokens:
            import polars as pl

            names = pl.scan_parquet(self.folder / "tokens.parquet").collect_schema().names()
            exclude_special_tokens = "is_special" in names
        return bool(exclude_first_token), bool(exclude_special_tokens)

    def selection(
        self,
        split: str | None = "train",
        exclude_first_token: bool | None = None,
        exclude_special_tokens: bool | None = None,
    ) -> RowSelection:
        """The rows of a split ('train', 'heldout' or None for all) as a `RowSelection`: counts per shard,
        each shard's rows read from the token table when it is read, so no tensor of every row is held.

        By default the cache's own settings decide whether position 0 and special tokens (BOS, CLS, SEP, ...)
        are left out; pass False to keep them.
        """
        first, special = self._filters(exclude_first_token, exclude_special_tokens)
        # every hookpoint has the same shards; a hand-written manifest may list none, or leave n_tokens out
        listed = [len(info["shards"]) for info in self.manifest["hookpoints"].values()]
        n_shards = max([*listed, -(-int(self.manifest.get("n_tokens", 0)) // self.shard_tokens)])
        return RowSelection.from_table(
            self.folder / "tokens.parquet",
            self.shard_tokens,
            n_shards,
            split=split,
            exclude_first_token=first,
            exclude_special=special,
        )

    def select_rows(
        self,
        split: str | None = None,
        exclude_first_token: bool | None = None,
        exclude_special_tokens: bool | None = None,
        limit: int | None = None,
    ) -> torch.Tensor:
        """Row indices of the token table for a split ('train', 'heldout' or None for all), ascending; with
        `limit`, the first `limit` of them only (the table is then read no further than they reach).

        The filters are those of `selection`; prefer `selection` to a tensor of every row of a large corpus.
        """
        first, special = self._filters(exclude_first_token, exclude_special_tokens)
        where = table_filter(split, first, special)
        path = self.folder / "tokens.parquet"
        return table_rows(path, where) if limit is None else table_head(path, where, limit)

    def load(self, hookpoint: str, rows: torch.Tensor | RowSelection | None = None) -> torch.Tensor:
        """Activations of `hookpoint` for the given rows (all rows when None), as one CPU tensor, in the order
        of `rows` (of a `RowSelection`: shard by shard).

        Only the shards holding the rows are read (or, unstored, recomputed), one at a time.
        """
        n_shards = self.n_shards(hookpoint)
        if rows is None:
            return torch.cat([self.read_shard(hookpoint, s) for s in range(n_shards)])
        if isinstance(rows, RowSelection):
            return self._load_selection(hookpoint, rows)
        rows = rows.to(torch.int64)
        shard_of = rows // self.shard_tokens
        out: torch.Tensor | None = None
        order = torch.argsort(shard_of, stable=True)
        shards, counts = torch.unique_consecutive(shard_of[order], return_counts=True)
        ends = counts.cumsum(0).tolist()
        for s, end, count in zip(shards.tolist(), ends, counts.tolist()):
            where = order[end - count : end]
            acts = self.read_shard(hookpoint, s)[rows[where] - s * self.shard_tokens]
            if out is None:
                out = torch.empty(rows.numel(), acts.shape[1], dtype=acts.dtype)
            out[where] = acts
        return self._empty(hookpoint) if out is None else out

    def _load_selection(self, hookpoint: str, selection: RowSelection) -> torch.Tensor:
        out: torch.Tensor | None = None
        at = 0
        for s, count in enumerate(selection.counts.tolist()):
            if not count:
                continue
            acts = self.read_shard(hookpoint, s)
            if out is None:
                out = torch.empty(selection.n_rows, acts.shape[1], dtype=acts.dtype)
            torch.index_select(acts, 0, selection.shard(s) - s * self.shard_tokens, out=out[at : at + count])
            at += count
        return self._empty(hookpoint) if out is None else out

    def _empty(self, hookpoint: str) -> torch.Tensor:
        return torch.empty(0, int(self._info(hookpoint)["d_in"]), dtype=DTYPES[self.manifest["dtype"]])

    def stream(
        self,
        hookpoint: str,
        rows: torch.Tensor | RowSelection | None = None,
        *,
        batch_size: int = 4096,
        seed: int = 0,
        epoch: int = 0,
        buffer_shards: int = 4,
        skip: int = 0,
        limit: int | None = None,
        prefetch: bool = True,
        pin_memory: bool = False,
        check: Callable[[int, torch.Tensor], None] | None = None,
    ) -> Iterator[StreamBatch]:
        """Shuffled batches of `rows` (default: the train split), at most `buffer_shards` shards in memory
        (twice that while the next group is read ahead in a background thread); `check(s, acts)` sees the
        selected rows of each shard as it is read.

        See `tasks.common.stream.stream_batches`.
        """
        from featureatlas.tasks.common.stream import stream_batches

        return stream_batches(
            lambda s: self.read_shard(hookpoint, s),
            self.as_selection(hookpoint, rows),
            batch_size=batch_size,
            seed=seed,
            epoch=epoch,
            buffer_shards=buffer_shards,
            skip=skip,
            limit=limit,
            prefetch=prefetch,
            pin_memory=pin_memory,
            check=check,
            full_threads=not self.stored,  # recomputing runs the model there: it keeps every thread
        )

    def as_selection(self, hookpoint: str, rows: torch.Tensor | RowSelection | None) -> RowSelection:
        """`rows` as a `RowSelection` over `hookpoint`'s shards (None: the train split)."""
        if rows is None:
            return self.selection("train")
        if isinstance(rows, RowSelection):
            return rows
        return RowSelection.from_rows(rows, self.shard_tokens, self.n_shards(hookpoint))

    def read_shard(self, hookpoint: str, index: int) -> torch.Tensor:
        """One shard of `hookpoint` [rows, d_in]; a missing or truncated file is refused by name."""
        info = self._info(hookpoint)
        if not self.stored:
            return self.recompute.shard(hookpoint, index)
        shard = info["shards"][index]
        return load_file(str(check_shard_size(self.folder, hookpoint, shard)))["acts"]

    def _info(self, hookpoint: str) -> dict:
        info = self.manifest["hookpoints"].get(hookpoint)
        if info is None:
            raise ValueError(f"hookpoint {hookpoint!r} is not in this cache; cached: {self.hookpoints}")
        return info
