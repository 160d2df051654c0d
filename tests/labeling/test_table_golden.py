"""The feature table of a seeded toy is pinned: every column, every value (floats to 1e-6), so a faster or
device-resident implementation of the passes cannot change what the table says.

The toy has padded contexts of several lengths, position 0 left out of the activation rows (so a row is not
`context * length + position`), an unembedding, and batches that split contexts. `golden_table.parquet` was
written by the reference implementation; `python -m tests.labeling.test_table_golden` rewrites it.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
import torch

from featureatlas.tasks.labeling.features import Unembedding, build_feature_table
from featureatlas.tasks.labeling.stat_labeler import count_ngrams

GOLDEN = Path(__file__).parent / "data" / "golden_table.parquet"
VOCAB = 50


class ToyRelu(torch.nn.Module):
    """relu(x @ W_enc + b): about 6 of 64 latents fire per row; latents 60.. never fire."""

    def __init__(self, d_in: int = 16, d_sae: int = 64):
        super().__init__()
        gen = torch.Generator().manual_seed(1)
        self.d_in, self.d_sae = d_in, d_sae
        self.W_enc = torch.nn.Parameter(torch.randn(d_in, d_sae, generator=gen) / d_in**0.5)
        self.b_enc = torch.nn.Parameter(torch.full((d_sae,), -1.2))
        with torch.no_grad():
            self.b_enc[60:] = -1e3

    def encode(self, acts):
        return torch.relu(acts @ self.W_enc + self.b_enc)

    def decoder_directions(self):
        return self.W_enc.T


def toy_corpus(n_ctx: int = 48, length: int = 24, seed: int = 0):
    """(acts, row_context, row_position, context_tokens): padded contexts, position 0 left out, and a
    token-dependent part of each activation so that contexts and labels carry structure."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (n_ctx, length), generator=gen)
    lengths = torch.randint(length // 2, length + 1, (n_ctx,), generator=gen)
    tokens[torch.arange(length)[None, :] >= lengths[:, None]] = -1
    ctx, pos = (tokens >= 0).nonzero(as_tuple=True)
    keep = pos > 0
    ctx, pos = ctx[keep], pos[keep]
    embed = torch.randn(VOCAB, 16, generator=gen)
    acts = embed[tokens[ctx, pos]] + 0.7 * torch.randn(len(ctx), 16, generator=gen)
    return acts, ctx, pos, tokens


def token_strings(ids):
    return [f" w{i}" for i in ids]


def toy_table(dictionary: torch.nn.Module | None = None, **kwargs) -> pl.DataFrame:
    dictionary = ToyRelu() if dictionary is None else dictionary
    acts, rc, rp, tokens = toy_corpus()
    W_U = torch.randn(VOCAB, 16, generator=torch.Generator().manual_seed(2))
    return build_feature_table(
        dictionary,
        acts,
        rc,
        rp,
        tokens,
        token_strings,
        count_ngrams(tokens),
        unembedding=Unembedding(W_U, torch.rand(16, generator=torch.Generator().manual_seed(3)) + 0.5),
        top_k=5,
        window=3,
        batch_size=37,
        **kwargs,
    )


def assert_tables_equal(got: pl.DataFrame, want: pl.DataFrame) -> None:
    from polars.testing import assert_frame_equal

    assert got.columns == want.columns
    assert_frame_equal(got, want, check_exact=False, rel_tol=1e-6, abs_tol=1e-6)


@pytest.mark.parametrize("spill_budget", [8 << 30, 0])
def test_table_equals_the_pinned_one(spill_budget):
    assert_tables_equal(toy_table(spill_budget=spill_budget), pl.read_parquet(GOLDEN))


def test_the_pinned_table_is_not_trivial():
    want = pl.read_parquet(GOLDEN)
    fired = want.filter(pl.col("frequency") > 0)
    assert 40 <= fired.height <= 60
    assert fired["stat_label"].is_not_null().sum() > 5
    assert fired["quantile_examples"].list.len().min() > 0
    assert fired["cooccurring"].list.len().min() > 0


if __name__ == "__main__":
    GOLDEN.parent.mkdir(exist_ok=True)
    toy_table().write_parquet(GOLDEN)
