"""Labeling a semi-NMF dictionary through the shared interface: its token weights G are the activations.

A hand-set semi-NMF dictionary (48 unit features in 32 dimensions, so they overlap and NNLS leaves small
residues on every feature) reads activations built as non-negative mixtures of 3 features per token, plus the
planted feature 0 on every " cat" token. Labeling must find " cat" in feature 0's top contexts, label it
so and score it near 1, and must not call every feature active on every token (G is never exactly 0).
"""

from __future__ import annotations

import torch

from featureatlas.schemas.methods import SemiNMFConfig
from featureatlas.tasks.dictionary.snmf import SemiNMF
from featureatlas.tasks.labeling.features import build_feature_table
from featureatlas.tasks.labeling.stat_labeler import count_ngrams
from tests.labeling.test_top_contexts import CAT, VOCAB, token_strings


def planted_snmf(n_ctx: int = 40, length: int = 16, d_in: int = 32, d_sae: int = 48):
    gen = torch.Generator().manual_seed(0)
    W_dec = torch.nn.functional.normalize(torch.randn(d_sae, d_in, generator=gen), dim=1)
    snmf = SemiNMF(SemiNMFConfig(d_sae=d_sae), d_in)
    snmf.W_dec.copy_(W_dec)
    tokens = torch.randint(0, len(VOCAB), (n_ctx, length), generator=gen)
    n = n_ctx * length
    G = torch.zeros(n, d_sae)
    for i in range(n):
        G[i, torch.randperm(d_sae - 1, generator=gen)[:3] + 1] = 1 + torch.rand(3, generator=gen)
    is_cat = tokens.flatten() == CAT
    G[is_cat, 0] = 1 + torch.rand(int(is_cat.sum()), generator=gen)
    rows = torch.arange(n)
    return snmf.eval(), G @ W_dec, rows // length, rows % length, tokens, is_cat


def test_planted_semi_nmf_feature_is_found_and_labeled():
    snmf, acts, rc, rp, tokens, is_cat = planted_snmf()
    G = snmf.encode(acts)
    assert (
        G > 0
    ).float().mean() > 0.99  # the residues: without the firing mask every feature fires everywhere
    df = build_feature_table(snmf, acts, rc, rp, tokens, token_strings, count_ngrams(tokens), top_k=5)
    cat = df.row(0, named=True)
    assert [c["context"] * 16 + c["position"] for c in cat["contexts"]] == (
        torch.argsort(G[:, 0], descending=True)[:5].tolist()
    )
    assert cat["top_tokens"] == [" cat"] * 5 and cat["label"] == '" cat"'
    assert cat["stat_label"] == '" cat"'
    # near 1, not 1: residues just over the firing share (~0.15, against >= 1 on cat tokens) fill the lowest
    # activation quantile bin, whose held-out samples are then not " cat"
    assert cat["detection_score"] > 0.8
    # frequency counts the tokens where feature 0 is at least a tenth of the token's largest weight: every
    # cat token (weight >= 1 against residues below 0.5) and few others
    assert int(is_cat.sum()) / len(is_cat) <= cat["frequency"] <= 1.5 * int(is_cat.sum()) / len(is_cat)
    # the window shows the token weights around the peak, the peak's own equal to its activation
    top = cat["contexts"][0]
    assert top["token_activations"][top["centre"]] == top["activation"]
    # other features fire on about the 3 of 48 they were mixed into, not on every token
    assert df["frequency"].mean() < 0.2
