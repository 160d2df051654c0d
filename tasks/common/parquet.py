"""Parquet files read a row group at a time."""

from __future__ import annotations

from pathlib import Path


def open_parquet(path: Path):
    """A `pyarrow.parquet.ParquetFile` whose `iter_batches` holds one row group, not the file.

    pyarrow's default (`pre_buffer=True`) reads ahead into its memory pool as the batches are taken, and the
    pool kept it: reading a 400 MB documents.parquet (256 row groups) 64 rows at a time held 0.38 GB at the
    end, against 4.5 MB without pre-buffering. The file is read in order once, so read-ahead buys nothing.
    """
    import pyarrow.parquet as pq

    return pq.ParquetFile(path, pre_buffer=False)
