"""The token table written a chunk of contexts at a time equals the table written at once, row for row."""

from __future__ import annotations

import polars as pl
import torch

from featureatlas.tasks.activations import token_table
from featureatlas.tasks.common.contexts import Contexts
from tests.helpers import build_tiny_tokenizer


def test_token_table_in_chunks_equals_the_table_at_once(monkeypatch, tmp_path):
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 300, (11, 8), generator=gen)
    mask = torch.ones_like(ids)
    mask[3, 5:] = 0  # a short context: its padding gets no row
    contexts = Contexts.from_tensors(ids, mask, torch.arange(11) // 2, torch.arange(11) % 4 == 3)
    docs = pl.DataFrame({"doc_id": [f"d{i}" for i in range(6)]})
    tokenizer = build_tiny_tokenizer()
    whole = token_table.write_token_table(tokenizer, docs, contexts, 16, tmp_path / "whole.parquet")
    monkeypatch.setattr(token_table, "TOKEN_CHUNK_ROWS", 10)  # chunks of about 10 rows: 9 row groups
    chunked = token_table.write_token_table(tokenizer, docs, contexts, 16, tmp_path / "chunked.parquet")
    assert chunked == whole and whole["n_heldout_tokens"] == 5 + 8  # contexts 3 (5 tokens) and 7
    a, b = pl.read_parquet(tmp_path / "whole.parquet"), pl.read_parquet(tmp_path / "chunked.parquet")
    assert a.equals(b) and a["row"].to_list() == list(range(int(mask.sum())))
    assert b["shard"].max() == (int(mask.sum()) - 1) // 16
