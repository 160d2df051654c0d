"""The shuffled streaming reader: every selected row once per epoch, batches mixing shards, bounded reads,
truncated shards refused by name."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from featureatlas.schemas.spec import CacheSpec, CorpusSpec
from featureatlas.tasks.activations.cache import write_cache
from featureatlas.tasks.common.corpus import load_documents
from featureatlas.tasks.common.models import LoadedModel
from featureatlas.tasks.common.shards import CacheIntegrityError
from featureatlas.tasks.common.store import ActivationCache
from tests.helpers import TINY_TEXT, build_tiny_llama, build_tiny_tokenizer


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stream")
    path = tmp / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": " ".join(TINY_TEXT[i : i + 5])}) for i in range(12)))
    corpus = CorpusSpec(
        sources=[str(path)], context_length=16, max_tokens=900, heldout_fraction=0.3, min_context_tokens=4
    )
    write_cache(
        LoadedModel(build_tiny_llama(), build_tiny_tokenizer(bos=True), torch.device("cpu")),
        load_documents(corpus),
        corpus,
        CacheSpec(shard_tokens=64, batch_size=4),
        ["model.layers.0"],
        tmp / "cache",
        header={"model_id": "m"},
    )
    return tmp / "cache"


def test_every_row_exactly_once_per_epoch(cache_dir):
    store = ActivationCache(cache_dir)
    rows = store.select_rows("train")
    full = store.load("model.layers.0")
    epochs = []
    for epoch in range(2):
        batches = list(
            store.stream("model.layers.0", rows, batch_size=50, seed=3, epoch=epoch, buffer_shards=3)
        )
        assert [len(b.rows) for b in batches[:-1]] == [50] * (len(batches) - 1) and len(batches[-1].rows) > 0
        seen = torch.cat([b.rows for b in batches])
        assert sorted(seen.tolist()) == sorted(rows.tolist())  # each selected row once, nothing else
        for b in batches:
            torch.testing.assert_close(b.acts, full[b.rows], rtol=0, atol=0)
        epochs.append(seen)
    assert not torch.equal(epochs[0], epochs[1])  # a new order each epoch
    again = torch.cat([b.rows for b in store.stream("model.layers.0", rows, batch_size=50, seed=3, epoch=1)])
    assert not torch.equal(again, epochs[0])
    # shuffled across sequences and shards: the first batch draws from several shards and many contexts
    first = epochs[0][:50]
    shard_tokens = store.manifest["shard_tokens"]
    assert len(set((first // shard_tokens).tolist())) >= 2
    assert len(set(store.tokens["context"].to_numpy()[first.numpy()].tolist())) >= 8  # of ~12 in 3 shards


def test_same_seed_same_batches_and_defaults_to_train(cache_dir):
    store = ActivationCache(cache_dir)
    a = [b.rows for b in store.stream("model.layers.0", batch_size=64, seed=1)]
    b = [b.rows for b in store.stream("model.layers.0", batch_size=64, seed=1)]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert sorted(torch.cat(a).tolist()) == sorted(store.select_rows("train").tolist())


def test_truncated_shard_is_refused_by_name(cache_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(cache_dir, copy)
    shard = copy / "acts" / "model.layers.0" / "00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CacheIntegrityError, match=r"model.layers.0/00002.safetensors.*truncated"):
        ActivationCache(copy)
    unverified = ActivationCache(copy, verify=False)
    with pytest.raises(CacheIntegrityError, match=r"00002.safetensors.*truncated"):
        list(unverified.stream("model.layers.0", unverified.select_rows(None), batch_size=32))


def test_a_split_is_selected_shard_by_shard_from_the_token_table(cache_dir):
    """`selection` counts rows per shard and reads a shard's rows when asked: the rows `select_rows` lists,
    the same activations, the same stream; `limit` bounds what `select_rows` returns."""
    import polars as pl

    store = ActivationCache(cache_dir)
    t = store.tokens
    for split in ("train", "heldout"):
        want = t.filter((pl.col("split") == split) & (pl.col("position") > 0) & ~pl.col("is_special"))["row"]
        rows = store.select_rows(split)
        assert rows.tolist() == want.to_list() and rows.numel() > 20
        selection = store.selection(split)
        T = store.shard_tokens
        assert selection.n_rows == rows.numel() and selection.n_shards == store.n_shards("model.layers.0")
        assert selection.counts.tolist() == torch.bincount(rows // T, minlength=selection.n_shards).tolist()
        assert torch.equal(torch.cat([selection.shard(s) for s in range(selection.n_shards)]), rows)
        assert torch.equal(store.select_rows(split, limit=7), rows[:7])
        assert torch.equal(selection.rows(), rows) and torch.equal(selection.rows(limit=7), rows[:7])
        assert torch.equal(store.load("model.layers.0", selection), store.load("model.layers.0", rows))
        kw = {"batch_size": 16, "seed": 4, "buffer_shards": 2}
        a = list(store.stream("model.layers.0", selection, **kw))
        b = list(store.stream("model.layers.0", rows, **kw))
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x.rows, y.rows) and torch.equal(x.acts, y.acts)
    kept = store.selection(None, exclude_first_token=False, exclude_special_tokens=False)
    assert kept.n_rows == t.height and int(kept.counts.max()) == T  # every row: full shards


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_shard_writer_makes_safetensors_bytes(tmp_path, dtype):
    import hashlib

    from safetensors.torch import save

    from featureatlas.tasks.common.shards import write_acts_shard

    acts = torch.randn(7, 5).to(dtype)
    sha = write_acts_shard(acts, tmp_path / "s.safetensors")
    data = (tmp_path / "s.safetensors").read_bytes()
    assert data == save({"acts": acts}) and sha == hashlib.sha256(data).hexdigest()


def test_a_resumed_epoch_reads_only_the_shards_it_still_needs(cache_dir, monkeypatch):
    """`skip` yields exactly the tail of the uninterrupted epoch, `limit` stops reading past the end."""
    store = ActivationCache(cache_dir)
    rows = store.select_rows("train")
    full = list(store.stream("model.layers.0", rows, batch_size=20, seed=5, buffer_shards=2))
    order = torch.cat([b.rows for b in full])
    acts = torch.cat([b.acts for b in full])
    reads: list[int] = []
    read_shard = ActivationCache.read_shard
    monkeypatch.setattr(
        ActivationCache, "read_shard", lambda self, hp, s: reads.append(s) or read_shard(self, hp, s)
    )
    n_shards = store.n_shards("model.layers.0")
    for skip in (0, 1, 45, order.numel() - 3, order.numel()):
        reads.clear()
        got = list(store.stream("model.layers.0", rows, batch_size=20, seed=5, buffer_shards=2, skip=skip))
        got_rows = torch.cat([b.rows for b in got]) if got else torch.empty(0, dtype=torch.int64)
        assert torch.equal(got_rows, order[skip:])
        if got:
            assert torch.equal(torch.cat([b.acts for b in got]), acts[skip:])
        if skip == order.numel():
            assert reads == []
    reads.clear()
    head = list(store.stream("model.layers.0", rows, batch_size=20, seed=5, buffer_shards=2, limit=20))
    assert torch.equal(head[0].rows, order[:20]) and len(reads) <= 2 < n_shards  # one group of two


def test_a_bfloat16_model_stores_bfloat16_shards_by_default(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": " ".join(TINY_TEXT[i : i + 5])}) for i in range(4)))
    corpus = CorpusSpec(sources=[str(path)], context_length=16, max_tokens=256, min_context_tokens=4)
    model = build_tiny_llama().to(torch.bfloat16)
    loaded = LoadedModel(model, build_tiny_tokenizer(bos=True), torch.device("cpu"))
    for spec, expected in ((CacheSpec(shard_tokens=64), torch.bfloat16), (CacheSpec(dtype="float32"), None)):
        out = tmp_path / f"cache-{spec.dtype}"
        write_cache(loaded, load_documents(corpus), corpus, spec, ["model.layers.0"], out, header={})
        store = ActivationCache(out)
        assert store.read_shard("model.layers.0", 0).dtype == (expected or torch.float32)
        assert store.manifest["dtype"] == ("bfloat16" if expected else "float32")


def test_probe_sample_reads_only_drawn_rows_and_matches_a_draw_over_every_row(cache_dir):
    """The interaction probe's sample: the rows a seeded draw over the whole row list gives, in row order,
    from per-shard counts; every row when the cache holds fewer than asked."""
    import numpy as np

    from featureatlas.tasks.interactions.probe import sample_rows

    store = ActivationCache(cache_dir)
    every = store.select_rows(None).numpy()
    for seed in (0, 3):
        want = np.sort(np.random.default_rng(seed).choice(every, 40, replace=False))
        got = sample_rows(store, 40, seed)
        assert np.array_equal(got, want) and np.all(np.diff(got) > 0)
    assert np.array_equal(sample_rows(store, len(every) + 5, 0), every)


def test_heldout_contexts_are_read_as_slices(cache_dir):
    """Evaluation's held-out contexts: the first n flagged contexts, the same as loading the file whole."""
    from featureatlas.tasks.evaluate.task import heldout_contexts

    store = ActivationCache(cache_dir)
    ctx = store.contexts()
    idx = ctx["heldout"].bool().nonzero().squeeze(1)
    assert len(idx) >= 2
    ids, mask = heldout_contexts(store, 2)
    assert torch.equal(ids, ctx["input_ids"][idx[:2]]) and torch.equal(mask, ctx["attention_mask"][idx[:2]])
    ids, _ = heldout_contexts(store, 10_000)
    assert ids.shape[0] == len(idx)
