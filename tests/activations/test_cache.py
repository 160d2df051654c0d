"""The activation cache on a tiny Llama: rows equal the model's hidden states, checksums guard the shards."""

from __future__ import annotations

import json

import polars as pl
import pytest
import torch

from featureatlas.schemas.spec import CacheSpec, CorpusSpec
from featureatlas.tasks.activations.cache import write_cache
from featureatlas.tasks.common.corpus import build_contexts, load_documents
from featureatlas.tasks.common.models import LoadedModel
from featureatlas.tasks.common.shards import CacheIntegrityError
from featureatlas.tasks.common.store import ActivationCache
from tests.helpers import TINY_TEXT, build_tiny_llama, build_tiny_tokenizer


@pytest.fixture
def corpus(tmp_path) -> CorpusSpec:
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": " ".join(TINY_TEXT[i : i + 5])}) for i in range(12)))
    return CorpusSpec(
        sources=[str(path)], context_length=16, max_tokens=600, heldout_fraction=0.3, min_context_tokens=4
    )


@pytest.fixture
def cached(tmp_path, corpus):
    model, tok = build_tiny_llama(), build_tiny_tokenizer()
    docs = load_documents(corpus)
    out = tmp_path / "cache"
    spec = CacheSpec(shard_tokens=100, batch_size=4)
    summary = write_cache(
        LoadedModel(model, tok, torch.device("cpu")),
        docs,
        corpus,
        spec,
        ["model.layers.0", "model.layers.1"],
        out,
        header={"model_id": "m"},
    )
    return model, tok, docs, out, summary


def test_rows_are_the_models_hidden_states(cached, corpus):
    model, tok, docs, out, summary = cached
    store = ActivationCache(out)
    contexts = build_contexts(docs, tok, corpus)
    real = int(contexts.attention_mask.sum())
    assert summary.n_tokens == real == store.tokens.height <= corpus.max_tokens
    # recompute with output_hidden_states and compare row by row
    with torch.no_grad():
        hs = model(
            input_ids=contexts.input_ids, attention_mask=contexts.attention_mask, output_hidden_states=True
        ).hidden_states
    mask = contexts.attention_mask.bool()
    torch.testing.assert_close(store.load("model.layers.0"), hs[1][mask])
    torch.testing.assert_close(store.load("model.layers.1"), hs[2][mask], rtol=1e-4, atol=1e-5)
    # the token table lines up with the rows
    t = store.tokens
    assert t["row"].to_list() == list(range(real))
    assert t["token_id"].to_list() == contexts.input_ids[mask].tolist()
    assert t.filter(pl.col("position") == 0).height == contexts.input_ids.shape[0]


def test_manifest_shards_and_statistics(cached):
    _, _, _, out, summary = cached
    m = json.loads((out / "manifest.json").read_text())
    info = m["hookpoints"]["model.layers.0"]
    assert [s["rows"] for s in info["shards"]][:-1] == [100] * (len(info["shards"]) - 1)
    assert sum(s["rows"] for s in info["shards"]) == summary.n_tokens
    acts = ActivationCache(out).load("model.layers.0").double()
    torch.testing.assert_close(torch.tensor(info["mean"], dtype=torch.float64), acts.mean(0))
    assert info["mean_norm"] == pytest.approx(float(acts.norm(dim=1).mean()), rel=1e-6)
    torch.testing.assert_close(torch.tensor(info["rms"], dtype=torch.float64), acts.pow(2).mean(0).sqrt())
    assert info["mean_squared_norm"] == pytest.approx(float(acts.pow(2).sum(1).mean()), rel=1e-9)
    assert info["module"] == "model.layers.0" and info["read"] == "output"
    assert m["n_train_tokens"] + m["n_heldout_tokens"] == m["n_tokens"]


def test_splits_follow_documents_and_skip_position_zero(cached):
    _, _, _, out, _ = cached
    store = ActivationCache(out)
    t = store.tokens
    # a document is wholly train or wholly held out
    assert t.group_by("doc_id").agg(pl.col("split").n_unique())["split"].max() == 1
    train = store.select_rows("train")
    assert (t["position"].to_numpy()[train.numpy()] > 0).all()
    both = torch.cat([train, store.select_rows("heldout")])
    assert sorted(both.tolist()) == t.filter(pl.col("position") > 0)["row"].to_list()


def test_corrupt_or_missing_shard_is_refused_by_name(cached):
    _, _, _, out, _ = cached
    shard = out / "acts" / "model.layers.1" / "00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheIntegrityError, match=r"model.layers.1/00001.safetensors.*checksum"):
        ActivationCache(out)
    shard.unlink()
    with pytest.raises(CacheIntegrityError, match="missing"):
        ActivationCache(out)


def test_bad_hookpoint_fails_before_any_work(tmp_path, corpus):
    model, tok = build_tiny_llama(), build_tiny_tokenizer()
    with pytest.raises(ValueError, match=r"'model.layer.1' not found.*model.layers.1"):
        write_cache(
            LoadedModel(model, tok, torch.device("cpu")),
            load_documents(corpus),
            corpus,
            CacheSpec(),
            ["model.layer.1"],
            tmp_path / "c",
            header={},
        )
    assert not (tmp_path / "c").exists()


def test_missing_corpus_file_says_so(tmp_path):
    spec = CorpusSpec(sources=[str(tmp_path / "nope.txt")])
    with pytest.raises(FileNotFoundError, match="nope.txt.*does not exist"):
        load_documents(spec)


def test_builtin_pydoc_corpus_is_real_text():
    docs = load_documents(CorpusSpec(sources=["builtin:pydoc_topics"]))
    assert docs.height > 50 and docs["text"].str.len_chars().sum() > 300_000
    assert set(docs["split"].unique()) == {"train", "heldout"}


def test_special_tokens_are_flagged_and_left_out_by_default(tmp_path, corpus):
    tok = build_tiny_tokenizer(bos=True)
    docs = load_documents(corpus)
    write_cache(
        LoadedModel(build_tiny_llama(), tok, torch.device("cpu")),
        docs,
        corpus,
        CacheSpec(shard_tokens=100, batch_size=4, exclude_first_token=False),
        ["resid_post.1"],
        tmp_path / "c",
        header={},
    )
    store = ActivationCache(tmp_path / "c")
    t = store.tokens
    bos = t.filter(pl.col("token_id") == tok.bos_token_id)
    # BOS starts each document's first context only; later contexts of a document start mid-text
    assert bos.height == t.filter(pl.col("is_special"))["doc_id"].n_unique() > 0
    assert bos["position"].unique().to_list() == [0] and bos["is_special"].all()
    assert t.filter(pl.col("position") == 0).height > bos.height
    assert store.manifest["n_special_tokens"] == bos.height
    kept = set(store.select_rows(None).tolist())
    assert kept == set(t.filter(~pl.col("is_special"))["row"].to_list())  # position 0 kept, BOS not
    assert len(store.select_rows(None, exclude_special_tokens=False)) == t.height
