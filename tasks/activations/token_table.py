"""The token table of a cache (tokens.parquet), written a chunk of contexts at a time.

One row per stored activation row, in the same order: row, context, position, token_id, token, is_special,
doc_id, split, shard, shard_row. Chunks of about `TOKEN_CHUNK_ROWS` rows become row groups of one Parquet
file, so building it takes memory set by the chunk, not by the corpus (10^8 rows are fine on disk, not as
Python strings in RAM). Readers scan it (`ActivationCache.select_rows` reads only the columns it filters on).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    import polars as pl

    from featureatlas.tasks.common.contexts import Contexts


def _token_strings(tokenizer, ids: list[int]) -> dict[int, str]:
    """Display string of every distinct id, decoded one id at a time (so ' the' keeps its space)."""
    return {i: tokenizer.decode([i]) for i in sorted(set(ids))}


TOKEN_CHUNK_ROWS = 1 << 18  # rows built and written at a time (~40 MB): memory set by this, not the corpus


def _context_chunks(contexts: Contexts, rows: int) -> list[tuple[int, int]]:
    """Context ranges [a, b) of about `rows` real tokens each."""
    ends = contexts.lengths.cumsum(0)
    bounds = [0]
    while bounds[-1] < len(ends):
        done = int(ends[bounds[-1] - 1]) if bounds[-1] else 0
        bounds.append(max(int(torch.searchsorted(ends, done + rows, right=True)), bounds[-1] + 1))
    return list(zip(bounds[:-1], bounds[1:]))


def write_token_table(
    tokenizer, documents: pl.DataFrame, contexts: Contexts, shard_tokens: int, path: Path
) -> dict:
    """Write tokens.parquet (one row per stored activation row, in the same order) a chunk of contexts at a
    time, as row groups of one file; return the split and special-token counts for the manifest."""
    import polars as pl
    import pyarrow.parquet as pq

    special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.int64)
    strings: dict[int, str] = {}
    lookup = pl.Series("token", [], dtype=pl.String)  # lookup[id]: the display string of every id seen
    counts = {"n_train_tokens": 0, "n_heldout_tokens": 0, "n_special_tokens": 0}
    row0 = 0
    tmp = path.with_name(path.name + ".tmp")
    writer = None
    try:
        for a, b in _context_chunks(contexts, TOKEN_CHUNK_ROWS):
            mask = contexts.mask(a, b)
            lengths = contexts.lengths[a:b]
            keep = mask.bool()
            context_of_row = torch.repeat_interleave(torch.arange(a, b), lengths)
            position = torch.arange(mask.shape[1]).expand_as(mask)[keep]
            token_ids = contexts.ids(a, b)[keep]
            new = set(token_ids.unique().tolist()) - strings.keys()
            if new:
                strings.update(_token_strings(tokenizer, list(new)))
                lookup = pl.Series("token", [strings.get(i) for i in range(max(strings) + 1)], pl.String)
            doc_rows = contexts.doc_rows(a, b)
            heldout = contexts.heldout[context_of_row]
            is_special = torch.isin(token_ids, special)
            row = torch.arange(row0, row0 + int(lengths.sum()))
            row0 += row.numel()
            frame = pl.DataFrame(
                {
                    "row": row.numpy(),
                    "context": context_of_row.numpy(),
                    "position": position.numpy(),
                    "token_id": token_ids.numpy(),
                    "token": lookup.gather(token_ids.numpy()),  # in polars: no Python loop over rows
                    "is_special": is_special.numpy(),
                    "doc_id": documents["doc_id"].gather(doc_rows.numpy()),
                    "split": pl.Series(heldout.numpy()).replace_strict({True: "heldout", False: "train"}),
                    "shard": (row // shard_tokens).numpy(),
                    "shard_row": (row % shard_tokens).numpy(),
                }
            ).to_arrow()
            if writer is None:
                writer = pq.ParquetWriter(str(tmp), frame.schema, compression="zstd")
            writer.write_table(frame)
            n_held = int(heldout.sum())
            counts["n_heldout_tokens"] += n_held
            counts["n_train_tokens"] += row.numel() - n_held
            counts["n_special_tokens"] += int(is_special.sum())
    finally:
        if writer is not None:
            writer.close()
    tmp.replace(path)
    return counts
