"""Which rows of a cache a reader takes, shard by shard, without a tensor of every selected row.

A training or evaluation reader needs, for shard s, the selected rows among [s*T, (s+1)*T) (T the shard
size), and before it starts only how many each shard holds (the shuffled epoch is planned from counts). So a
`RowSelection` holds one count per shard, and produces a shard's rows when that shard is read:

- `RowSelection.from_table`: the rows a filter of the token table keeps (split, position 0, special tokens).
  The counts come from one streamed pass over the filter columns; a shard's rows are re-read from
  tokens.parquet when the shard is read (rows [s*T, (s+1)*T) of the table are those of shard s, so one slice
  of the file, a few milliseconds, read in the reader's background thread). Memory is O(shards) at any
  corpus size. A packed 1-bit-per-row mask would save those re-reads, but still grows with the corpus (12 MB
  at 10^8 rows, 125 MB at 10^9); a re-read costs next to nothing against reading the shard's activations.
- `RowSelection.from_rows`: rows the caller already holds as a tensor (any order; a shard's rows keep their
  order in it). Its memory is the caller's tensor again, grouped by shard.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    import polars as pl


def table_filter(split: str | None, exclude_first_token: bool, exclude_special: bool) -> list[pl.Expr]:
    """The token-table filters of a selection: one split, position 0 left out, special tokens left out."""
    import polars as pl

    where = []
    if split is not None:
        where.append(pl.col("split") == split)
    if exclude_first_token:
        where.append(pl.col("position") > 0)
    if exclude_special:
        where.append(~pl.col("is_special"))
    return where


def table_rows(path: Path, where: list[pl.Expr], offset: int = 0, length: int | None = None) -> Tensor:
    """Rows of the token table at `path` that every filter in `where` keeps, among table rows
    [offset, offset + length) (all rows from `offset` on when `length` is None), ascending int64."""
    import polars as pl

    df = pl.scan_parquet(path)
    if offset or length is not None:
        df = df.slice(offset, length)  # pushed into the scan: only the row groups it covers are decoded
    for w in where:
        df = df.filter(w)
    return torch.from_numpy(df.select("row").collect()["row"].to_numpy().astype("int64"))


class RowSelection:
    """The selected rows of a cache of `n_shards` shards of `shard_tokens` rows: counts per shard, and the
    rows of one shard on demand (`shard(s)`, ascending within the shard for a table selection)."""

    def __init__(
        self,
        counts: Tensor,
        shard_tokens: int,
        read: Callable[[int], Tensor],
        all_rows: Callable[[int | None], Tensor],
    ) -> None:
        self.counts = counts.to(torch.int64)  # [n_shards] selected rows of each shard
        self.shard_tokens = shard_tokens
        self.n_rows = int(self.counts.sum())
        self._read, self._all = read, all_rows  # shard s's rows; the first `limit` rows in table order

    @property
    def n_shards(self) -> int:
        return self.counts.numel()

    @classmethod
    def from_rows(cls, rows: Tensor, shard_tokens: int, n_shards: int) -> RowSelection:
        """The rows of a tensor; shard s yields its rows in their order in `rows`."""
        rows = rows.to(torch.int64)
        shard_of = rows // shard_tokens
        if rows.numel() and (int(rows.min()) < 0 or int(shard_of.max()) >= n_shards):
            raise ValueError(
                f"selected rows must lie in [0, {n_shards * shard_tokens}) (the cache's {n_shards} shards "
                f"of {shard_tokens} rows); got rows {int(rows.min())}..{int(rows.max())}"
            )
        order = torch.argsort(shard_of, stable=True)  # one stable sort, not a mask per shard
        per_shard = list(torch.split(rows[order], torch.bincount(shard_of, minlength=n_shards).tolist()))
        counts = torch.tensor([p.numel() for p in per_shard], dtype=torch.int64)

        def whole(limit: int | None) -> Tensor:
            return rows if limit is None else rows[:limit]

        return cls(counts, shard_tokens, per_shard.__getitem__, whole)

    @classmethod
    def from_table(
        cls,
        path: Path,
        shard_tokens: int,
        n_shards: int,
        *,
        split: str | None = None,
        exclude_first_token: bool = False,
        exclude_special: bool = False,
    ) -> RowSelection:
        """The rows of the token table at `path` kept by the filters; counted per shard in one streamed pass
        over the filter columns, a shard's rows re-read from its slice of the table when it is read."""
        import polars as pl

        where = table_filter(split, exclude_first_token, exclude_special)
        df = pl.scan_parquet(path)
        for w in where:
            df = df.filter(w)
        per = (
            df.select((pl.col("row") // shard_tokens).alias("shard"))
            .group_by("shard")
            .len()
            .collect(engine="streaming")
        )
        counts = torch.zeros(n_shards, dtype=torch.int64)
        shard = torch.from_numpy(per["shard"].to_numpy().astype("int64"))
        if shard.numel() and int(shard.max()) >= n_shards:
            raise ValueError(
                f"{path} has rows past the cache's {n_shards} shards of {shard_tokens} rows; the token table "
                "does not belong to this cache: cache again"
            )
        counts[shard] = torch.from_numpy(per["len"].to_numpy().astype("int64"))

        def read(s: int) -> Tensor:
            if not counts[s]:
                return torch.empty(0, dtype=torch.int64)
            return table_rows(path, where, s * shard_tokens, shard_tokens)

        def whole(limit: int | None) -> Tensor:
            return table_rows(path, where) if limit is None else table_head(path, where, limit)

        return cls(counts, shard_tokens, read, whole)

    def shard(self, s: int) -> Tensor:
        """The selected rows of shard s (global row numbers, int64)."""
        rows = self._read(s)
        if rows.numel() != int(self.counts[s]):
            raise ValueError(
                f"shard {s} yields {rows.numel()} selected rows but was counted with {int(self.counts[s])}; "
                "the token table changed while it was read: open the cache again"
            )
        return rows

    def rows(self, limit: int | None = None) -> Tensor:
        """Every selected row as one tensor (the first `limit`), for readers that want them all at once."""
        return self._all(limit)


def table_head(path: Path, where: list[pl.Expr], limit: int) -> Tensor:
    """The first `limit` kept rows of the table; the streaming engine stops reading once it has them."""
    import polars as pl

    df = pl.scan_parquet(path)
    for w in where:
        df = df.filter(w)
    rows = df.select("row").head(limit).collect(engine="streaming")["row"]
    return torch.from_numpy(rows.to_numpy().astype("int64"))
