"""Feature statistics and the statistical labeler on the planted " cat" toy, and streaming = brute force."""

from __future__ import annotations

import json
from collections import Counter

import polars as pl
import pytest
import torch

from featureatlas.tasks.labeling import feature_stats
from featureatlas.tasks.labeling.code_stream import SparseBatch
from featureatlas.tasks.labeling.feature_stats import activation_statistics, decoder_neighbours, logit_effects
from featureatlas.tasks.labeling.features import FEATURE_COLUMNS, Unembedding, build_feature_table
from featureatlas.tasks.labeling.scoring import balanced_accuracy
from featureatlas.tasks.labeling.stat_labeler import count_ngrams, statistical_label
from tests.labeling.test_top_contexts import CAT, VOCAB, planted_toy, token_strings


class WithDecoder(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.d_in, self.d_sae = inner, inner.d_in, inner.d_sae

    def encode(self, acts):
        return self.inner.encode(acts)

    def decoder_directions(self):
        return self.inner.W_enc.T


def planted():
    dictionary, acts, rc, rp, tokens = planted_toy(n_ctx=40)
    return WithDecoder(dictionary), acts, rc, rp, tokens


def test_planted_cat_feature_table():
    dictionary, acts, rc, rp, tokens = planted()
    # Unembedding whose row for " cat" is the planted direction: latent 0 promotes " cat" most.
    W_U = torch.randn(len(VOCAB), dictionary.d_in) * 0.1
    W_U[CAT] = dictionary.inner.W_enc[:, 0] * 5
    df = build_feature_table(
        dictionary,
        acts,
        rc,
        rp,
        tokens,
        token_strings,
        count_ngrams(tokens),
        unembedding=Unembedding(W_U),
        top_k=5,
        batch_size=37,
    )
    for col, dtype in FEATURE_COLUMNS.items():
        assert df.schema[col] == dtype
    cat = df.row(0, named=True)
    assert cat["label"] == '" cat"'
    assert cat["stat_label"] == '" cat"'  # the promoted token is evidence, not part of the label
    evidence = json.loads(cat["stat_label_evidence"])
    assert evidence["promoted"] == [" cat"]
    assert evidence["ngrams"][0]["ids"] == [CAT] and evidence["ngrams"][0]["share"] == 1.0
    assert evidence["ngrams"][0]["lift"] > 5
    assert cat["detection_score"] == pytest.approx(1.0)
    assert cat["promoted_tokens"][0]["token"] == " cat"
    n_cat = int((tokens == CAT).sum())
    assert sum(cat["hist_counts"]) == n_cat
    assert len(cat["quantile_examples"]) >= 8
    for ex in cat["quantile_examples"]:
        assert tokens[ex["context"], ex["position"]] == CAT and "«cat»" in ex["text"]
    dead = df.row(1, named=True)
    assert dead["stat_label"] is None and dead["detection_score"] is None and sum(dead["hist_counts"]) == 0


@pytest.mark.parametrize("budget", [12 * 12, 12 * 5])
def test_streamed_statistics_equal_brute_force(budget):
    dictionary, acts, *_ = planted()
    codes = dictionary.encode(acts).detach()
    max_act = codes.max(0).values
    stats = activation_statistics(
        dictionary, lambda: acts.split(50), max_act, n_bins=10, cooc_budget=budget, n_cooc=3
    )
    for latent in range(dictionary.d_sae):
        c = codes[:, latent]
        fired = c[c > 0]
        expected = torch.histc(fired, bins=10, min=0, max=float(max_act[latent])) if fired.numel() else None
        if expected is not None:
            assert stats.hist[latent].sum() == fired.numel()
            assert torch.allclose(stats.hist[latent].float(), expected, atol=1.0)  # edge rounding
        rows = stats.sample_rows[latent].flatten()
        vals = stats.sample_vals[latent].flatten()
        for r, v in zip(rows.tolist(), vals.tolist()):
            if r >= 0:
                assert v == pytest.approx(c[r].item(), rel=1e-5) and v > 0
        assert all(c[r] == 0 for r in stats.random_rows[latent].tolist() if r >= 0)
    f = (codes > 0).double()
    inter = f.T @ f
    union = f.sum(0)[:, None] + f.sum(0)[None, :] - inter
    jac = inter / union.clamp_min(1)
    jac.fill_diagonal_(-1)
    top = torch.topk(jac, 3, dim=1).values
    assert torch.allclose(stats.cooc_jaccard, top, atol=1e-9)


@pytest.mark.parametrize("scatter", [False, True])  # pairs counted by bincount, or added atomically (GPU)
@pytest.mark.parametrize("product_cost", [0, 10**9])  # 0: always count pairs; 10^9: always one product
@pytest.mark.parametrize(("lo", "n", "max_pairs"), [(0, 40, 1 << 22), (7, 13, 50), (30, 10, 1)])
def test_cooccurrence_counts_equal_the_firing_matrix_product(
    monkeypatch, scatter, product_cost, lo, n, max_pairs
):
    monkeypatch.setattr(feature_stats, "DENSE_PAIR_COST", product_cost)
    monkeypatch.setattr(feature_stats, "SPARSE_PAIR_COST", product_cost)
    monkeypatch.setattr(feature_stats, "BINCOUNT_DEVICES", () if scatter else ("cpu",))
    gen = torch.Generator().manual_seed(3)
    d_sae, rows, start = 40, 64, 100
    # rows fire on 0..9 latents each (row 5 on none), so the padded tables have empty slots
    fired = (torch.rand(rows, d_sae, generator=gen) < torch.rand(rows, 1, generator=gen) / 4).float()
    fired[5] = 0
    r, lat = fired.nonzero(as_tuple=True)
    batch = SparseBatch(start, rows, r + start, lat, torch.rand(len(r), generator=gen) + 0.1)
    counts = torch.full((n, d_sae), 2.0, dtype=torch.float64)  # added to, not overwritten
    feature_stats._cooc_add(counts, batch, lo, d_sae, max_pairs=max_pairs)
    expected = 2.0 + (fired[:, lo : lo + n].T @ fired).double()
    assert torch.equal(counts, expected)


def test_decoder_neighbours_and_logit_effects_exact():
    # Rows 0 and 1 are at 45 degrees, row 2 is opposite row 0.
    W_dec = torch.tensor([[1.0, 0.0], [1.0, 1.0], [-1.0, 0.0]])
    idx, cos = decoder_neighbours(W_dec, n=1, chunk=2)
    assert idx.flatten().tolist() == [1, 0, 1]
    assert cos[0, 0].item() == pytest.approx(2**-0.5)
    # Token 0 reads dim 0, token 1 reads dim 1; the norm weight doubles dim 1.
    W_U = torch.eye(2)
    up_i, up_v, dn_i, dn_v = logit_effects(W_dec, W_U, torch.tensor([1.0, 2.0]), k=1)
    assert up_i.flatten().tolist() == [0, 1, 1] and up_v[1, 0].item() == 2.0
    assert dn_i.flatten().tolist() == [1, 0, 0] and dn_v[2, 0].item() == -1.0


def test_statistical_label_prefers_a_consistent_bigram():
    # Contexts: "a big red cat" style; the latent fires on " red" after " big" only.
    tokens = torch.tensor([[9, 10, 11, 1], [0, 10, 11, 2], [9, 11, 3, 4], [5, 6, 7, 8]])
    counts = count_ngrams(tokens)
    lab = statistical_label([(0, 2), (1, 2)], tokens, counts, token_strings)
    assert lab.items == [(10, 11)]
    assert lab.label == '" big red"'
    assert statistical_label([], tokens, counts, token_strings).label is None


def test_balanced_accuracy():
    assert balanced_accuracy([True, True], [False, False]) == 1.0
    assert balanced_accuracy([True, False], [True, False]) == 0.5
    assert balanced_accuracy([], [False]) is None


def test_feature_table_round_trips_parquet(tmp_path):
    dictionary, acts, rc, rp, tokens = planted()
    df = build_feature_table(dictionary, acts, rc, rp, tokens, token_strings, count_ngrams(tokens), top_k=3)
    df.write_parquet(tmp_path / "f.parquet")
    assert pl.read_parquet(tmp_path / "f.parquet").equals(df)


@pytest.mark.parametrize("chunk_tokens", [7, 1 << 22])  # merged across chunks of contexts, or counted at once
def test_ngram_counts_equal_counting_by_hand(chunk_tokens):
    gen = torch.Generator().manual_seed(4)
    tokens = torch.randint(0, 6, (9, 5), generator=gen)
    tokens[2, 3:] = -1  # a short context: padding is neither a token nor half of a bigram
    counts = count_ngrams(tokens, chunk_tokens=chunk_tokens)
    uni, bi = Counter(), Counter()
    for row in tokens.tolist():
        real = [t for t in row if t >= 0]
        uni.update((t,) for t in real)
        bi.update(zip(real[:-1], real[1:]))
    assert counts.n == sum(uni.values())
    for gram in [*((t,) for t in range(8)), *((a, b) for a in range(-1, 8) for b in range(8))]:
        assert counts.count(gram) == (uni if len(gram) == 1 else bi).get(gram, 0), gram
    assert counts.rate((0, 0)) == (bi[(0, 0)] + 1) / (counts.n + 1)


def test_top_per_row_breaks_ties_to_the_lower_column():
    scores = torch.tensor([[0.5, 0.2, 0.5, 0.9, 0.5], [0.1, 0.1, 0.1, 0.1, 0.3]], dtype=torch.float64)
    cols, vals = feature_stats._top_per_row(scores, 3)
    assert cols.tolist() == [[3, 0, 2], [4, 0, 1]]
    assert vals.tolist() == [[0.9, 0.5, 0.5], [0.3, 0.1, 0.1]]
