"""Top contexts and first labels: a planted " cat" feature is found and labeled; streaming = brute force."""

from __future__ import annotations

import polars as pl
import pytest
import torch
from torch import Tensor, nn

from featureatlas.tasks.labeling.top_contexts import (
    FEATURE_TABLE_SCHEMA,
    top_activating_contexts,
    write_feature_table,
)

VOCAB = ["The", " cat", " sat", " on", " the", " mat", ".", " dog", " log", " a", " big", " red"]
CAT = 1


def token_strings(ids: list[int]) -> list[str]:
    return [VOCAB[i] for i in ids]


class ReluLinear(nn.Module):
    """Stand-in dictionary: codes = relu(x @ W_enc + b_enc), acts_hat = codes @ W_enc.T."""

    def __init__(self, W_enc: Tensor, b_enc: Tensor):
        super().__init__()
        self.d_in, self.d_sae = W_enc.shape
        self.W_enc, self.b_enc = nn.Parameter(W_enc), nn.Parameter(b_enc)

    def encode(self, acts: Tensor) -> Tensor:
        return torch.relu(acts @ self.W_enc + self.b_enc)

    def decode(self, codes: Tensor) -> Tensor:
        return codes @ self.W_enc.T


def planted_toy(n_ctx: int = 20, length: int = 16, d_in: int = 16, d_sae: int = 12):
    """Rows of noise orthogonal to a direction u; rows whose token is " cat" also carry (1 + U[0,1]) * u.

    Latent 0 reads u with bias -0.5, so it fires on cat rows only; latent 1 has bias -1e6 and never fires;
    the other latents read random directions and fire on about half the rows.
    """
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, len(VOCAB), (n_ctx, length), generator=gen)
    u = torch.nn.functional.normalize(torch.randn(d_in, generator=gen), dim=0)
    noise = torch.randn(n_ctx * length, d_in, generator=gen)
    noise -= (noise @ u)[:, None] * u
    is_cat = (tokens.flatten() == CAT).float()
    acts = noise + (is_cat * (1 + torch.rand(n_ctx * length, generator=gen)))[:, None] * u
    W_enc = torch.randn(d_in, d_sae, generator=gen)
    W_enc[:, 0] = u
    b_enc = torch.zeros(d_sae)
    b_enc[0], b_enc[1] = -0.5, -1e6
    row_context = torch.arange(n_ctx).repeat_interleave(length)
    row_position = torch.arange(length).repeat(n_ctx)
    return ReluLinear(W_enc, b_enc), acts, row_context, row_position, tokens


def test_planted_cat_feature_is_found_and_labeled():
    dictionary, acts, row_context, row_position, tokens = planted_toy()
    df = top_activating_contexts(dictionary, acts, row_context, row_position, tokens, token_strings, top_k=5)
    assert df.schema == FEATURE_TABLE_SCHEMA
    assert df["latent"].to_list() == list(range(12))
    cat = df.row(0, named=True)
    n_cat = int((tokens == CAT).sum())
    assert n_cat > 5  # enough cat rows to fill the top 5
    assert cat["frequency"] == pytest.approx(n_cat / acts.shape[0])
    assert cat["label"] == '" cat"'
    assert cat["label_share"] == 1.0
    assert cat["top_tokens"] == [" cat"] * 5
    assert len(cat["contexts"]) == 5
    assert cat["max_activation"] == pytest.approx(dictionary.encode(acts)[:, 0].max().item())
    for c in cat["contexts"]:
        assert tokens[c["context"], c["position"]] == CAT
        assert "«cat»" in c["text"]
    activations = [c["activation"] for c in cat["contexts"]]
    assert activations == sorted(activations, reverse=True)


def test_never_firing_latent_has_no_label():
    dictionary, acts, row_context, row_position, tokens = planted_toy()
    df = top_activating_contexts(dictionary, acts, row_context, row_position, tokens, token_strings)
    dead = df.row(1, named=True)
    assert dead["frequency"] == 0.0
    assert dead["label"] is None and dead["label_share"] is None
    assert dead["top_tokens"] == [] and dead["contexts"] == []


@pytest.mark.parametrize("batch_size", [3, 50])
def test_streamed_top_k_equals_brute_force(batch_size):
    dictionary, acts, row_context, row_position, tokens = planted_toy()
    df = top_activating_contexts(
        dictionary, acts, row_context, row_position, tokens, token_strings, top_k=7, batch_size=batch_size
    )
    whole = top_activating_contexts(
        dictionary, acts, row_context, row_position, tokens, token_strings, top_k=7, batch_size=100_000
    )
    # Batched matmuls may round differently in the last bit, so activations are compared approximately.
    assert df.drop("max_activation", "contexts").equals(whole.drop("max_activation", "contexts"))
    assert df["max_activation"].to_list() == pytest.approx(whole["max_activation"].to_list(), rel=1e-6)

    codes = dictionary.encode(acts).detach()
    for latent in range(dictionary.d_sae):
        column = codes[:, latent]
        order = torch.argsort(column, descending=True)[:7]
        fired = [r for r in order.tolist() if column[r] > 0]
        contexts = df["contexts"][latent]
        assert [(c["context"], c["position"]) for c in contexts] == [
            (int(row_context[r]), int(row_position[r])) for r in fired
        ]
        assert [c["activation"] for c in contexts] == pytest.approx(
            [column[r].item() for r in fired], rel=1e-6
        )
        assert df["frequency"][latent] == pytest.approx((column > 0).float().mean().item())
        # every token of the window, gathered across batch boundaries (row = context * 16 + position)
        for c in contexts:
            first = c["context"] * 16 + c["position"] - c["centre"]
            expect = column[first : first + len(c["tokens"])].tolist()
            assert c["token_activations"] == pytest.approx(expect, rel=1e-5, abs=1e-6)


def _one_hot_toy():
    """One context "The cat sat on the mat" then padding (-1); latent j fires (1.0) on token id j only."""
    ids = [0, 1, 2, 3, 4, 5]
    tokens = torch.tensor([[*ids, -1, -1]])
    acts = torch.eye(len(VOCAB))[ids]
    dictionary = ReluLinear(torch.eye(len(VOCAB)), torch.zeros(len(VOCAB)))
    rows = torch.zeros(len(ids), dtype=torch.long), torch.arange(len(ids))
    return dictionary, acts, *rows, tokens


def test_text_window_marks_the_max_token():
    dictionary, acts, row_context, row_position, tokens = _one_hot_toy()
    narrow = top_activating_contexts(
        dictionary, acts, row_context, row_position, tokens, token_strings, window=2
    )
    wide = top_activating_contexts(
        dictionary, acts, row_context, row_position, tokens, token_strings, window=8
    )
    # Latent 2 fires on " sat" at position 2: two tokens either side, the leading space outside the marks.
    assert narrow["contexts"][2][0]["text"] == "The cat «sat» on the"
    assert narrow["contexts"][2][0]["position"] == 2
    # The window is cut at the start of the context and at its end (the -1 padding is dropped).
    assert narrow["contexts"][0][0]["text"] == "«The» cat sat"
    assert wide["contexts"][2][0]["text"] == "The cat «sat» on the mat"
    assert wide["label"][2] == '" sat"'
    assert wide["frequency"][2] == pytest.approx(1 / 6)


def test_write_feature_table_round_trips(tmp_path):
    dictionary, acts, row_context, row_position, tokens = planted_toy()
    df = top_activating_contexts(dictionary, acts, row_context, row_position, tokens, token_strings, top_k=3)
    path = write_feature_table(df, tmp_path / "features" / "table.parquet")
    assert pl.read_parquet(path).equals(df)
    assert [p.name for p in path.parent.iterdir()] == ["table.parquet"]  # no temporary file left


def test_mismatched_rows_are_refused():
    dictionary, acts, row_context, row_position, tokens = planted_toy()
    with pytest.raises(ValueError, match="one context index and one position per activation row"):
        top_activating_contexts(dictionary, acts, row_context[:-1], row_position, tokens, token_strings)
    with pytest.raises(ValueError, match="row_context must index"):
        top_activating_contexts(dictionary, acts, row_context + 100, row_position, tokens, token_strings)


def test_window_carries_the_activation_of_every_token():
    """Latent 0 reads 2 * " cat" + 0.5 * " sat" - " mat": in "The cat sat on the mat" its codes are
    (0, 2, 0.5, 0, 0, 0), worked out by hand. Row 0 ("The") is left out of acts, like an excluded first
    token."""
    _, acts, row_context, row_position, tokens = _one_hot_toy()
    W_enc = torch.zeros(len(VOCAB), 2)
    W_enc[1, 0], W_enc[2, 0], W_enc[5, 0] = 2.0, 0.5, -1.0
    W_enc[3, 1] = 1.0  # latent 1 fires on " on" only
    dictionary = ReluLinear(W_enc, torch.zeros(2))
    df = top_activating_contexts(
        dictionary, acts[1:], row_context[1:], row_position[1:], tokens, token_strings, top_k=2, window=2
    )
    cat, sat = df["contexts"][0]
    assert (cat["position"], cat["activation"]) == (1, 2.0)
    assert cat["tokens"] == ["The", " cat", " sat", " on"] and cat["centre"] == 1
    assert cat["token_activations"] == [None, 2.0, 0.5, 0.0]  # "The" has no activation row
    assert (sat["position"], sat["activation"]) == (2, 0.5)
    assert sat["tokens"] == ["The", " cat", " sat", " on", " the"] and sat["centre"] == 2
    assert sat["token_activations"] == [None, 2.0, 0.5, 0.0, 0.0]
    (on,) = df["contexts"][1]
    assert on["tokens"] == [" cat", " sat", " on", " the", " mat"]
    assert on["token_activations"] == [0.0, 0.0, 1.0, 0.0, 0.0]
    # the window runs into the -1 padding at the end: those positions are dropped, not given a value
    wide = top_activating_contexts(
        dictionary, acts, row_context, row_position, tokens, token_strings, window=8
    )
    assert wide["contexts"][1][0]["token_activations"] == [0.0, 0.0, 0.0, 1.0, 0.0, 0.0]
