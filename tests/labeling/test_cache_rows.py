"""Labeling a cache through `CacheRows` (token table and contexts read in chunks) gives the table of the
in-memory path, and holds no tensor of the corpus' size.

The toy cache has padded contexts, position 0 and a special token left out (the cache's own exclusions), a
label budget (`max_rows`), and chunks smaller than a context so that every streamed scan crosses chunks.
"""

from __future__ import annotations

import json

import polars as pl
import pytest
import torch
from safetensors.torch import save_file
from torch.utils._python_dispatch import TorchDispatchMode

from featureatlas.tasks.common.shards import ShardWriter
from featureatlas.tasks.common.store import ActivationCache
from featureatlas.tasks.labeling.corpus import CacheRows, TensorRows
from featureatlas.tasks.labeling.features import build_feature_table, feature_table
from featureatlas.tasks.labeling.sharded import ShardedActs, ShardRows
from featureatlas.tasks.labeling.stat_labeler import count_ngrams
from tests.labeling.test_table_golden import VOCAB, ToyRelu, assert_tables_equal

SPECIAL = 0


def write_cache(folder, n_ctx: int, length: int = 20, seed: int = 0, shard_tokens: int = 97):
    """A finished cache (manifest, shards, tokens.parquet, contexts.safetensors) of `n_ctx` contexts."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n_ctx, length), generator=gen)
    ids[:, 0] = SPECIAL  # a BOS-like special token opens every context
    ids[torch.rand(n_ctx, length, generator=gen) < 0.05] = SPECIAL
    lengths = torch.randint(length // 2, length + 1, (n_ctx,), generator=gen)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    ctx, pos = mask.nonzero(as_tuple=True)
    tok = ids[ctx, pos]
    embed = torch.randn(VOCAB, 16, generator=gen)
    acts = embed[tok] + 0.7 * torch.randn(len(tok), 16, generator=gen)
    writer = ShardWriter(folder, "h", d_in=16, dtype="float32", shard_tokens=shard_tokens)
    for lo in range(0, len(acts), shard_tokens):
        writer.add(acts[lo : lo + shard_tokens])
    manifest = {
        "hookpoints": {"h": writer.finish()},
        "exclude_first_token": True,
        "exclude_special_tokens": True,
        "shard_tokens": shard_tokens,
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    rows = torch.arange(len(tok))
    pl.DataFrame(
        {
            "row": rows.numpy(),
            "context": ctx.numpy(),
            "position": pos.numpy(),
            "token_id": tok.numpy(),
            "token": [f" w{i}" for i in tok.tolist()],
            "is_special": (tok == SPECIAL).numpy(),
            "split": ["train"] * len(tok),
        }
    ).write_parquet(folder / "tokens.parquet", row_group_size=64)
    save_file({"input_ids": ids * mask, "attention_mask": mask}, str(folder / "contexts.safetensors"))
    return ActivationCache(folder)


def names(ids):
    return [f" w{i}" for i in ids]


def streamed_table(store, max_rows=None, batch_size=37, window=3, **chunks):
    corpus = CacheRows(store, max_rows, **chunks)
    reader = ShardRows(store, "h")
    batches = lambda: (reader(r) for r in corpus.cache_rows(batch_size))  # noqa: E731
    return feature_table(ToyRelu(), batches, corpus, names, top_k=5, window=window), corpus


@pytest.mark.parametrize("max_rows", [None, 500])
def test_cache_rows_table_equals_the_in_memory_one(tmp_path, max_rows):
    store = write_cache(tmp_path, n_ctx=48)
    rows = store.select_rows(None)[:max_rows]
    tokens = store.tokens
    contexts = store.contexts()
    input_ids = contexts["input_ids"].masked_fill(contexts["attention_mask"] == 0, -1)
    want = build_feature_table(
        ToyRelu(),
        ShardedActs(store, "h", rows),
        torch.from_numpy(tokens["context"].to_numpy()[rows.numpy()]),
        torch.from_numpy(tokens["position"].to_numpy()[rows.numpy()]),
        input_ids,
        names,
        count_ngrams(input_ids),
        top_k=5,
        window=3,
        batch_size=37,
    )
    got, corpus = streamed_table(store, max_rows, chunk_rows=50, chunk_contexts=3)
    assert corpus.n_rows == len(rows)
    assert int(want["stat_label"].is_not_null().sum()) > 30
    assert_tables_equal(got, want)
    assert corpus.token_names() == {i: f" w{i}" for i in tokens["token_id"].unique().to_list()}


class LargestTensor(TorchDispatchMode):
    """Records the most elements of any tensor an operation allocates: the outputs of operations that do not
    return a view or an alias of an input (a view of a memory-mapped file, as `safetensors` slices one, or an
    in-place update holds no new memory)."""

    def __init__(self):
        super().__init__()
        self.most = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not any(r.alias_info is not None for r in func._schema.returns):
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.most = max(self.most, t.numel())
        return out


@pytest.fixture
def one_thread():
    """Thousands of tiny per-batch operations: a thread pool only adds its hand-offs (and, on a busy
    machine, waits for a descheduled worker)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow  # a 10x larger corpus
@pytest.mark.usefixtures("one_thread")
def test_labeling_a_cache_holds_no_tensor_of_the_corpus_size(tmp_path):
    most = {}
    for n_ctx in (600, 6000):
        folder = tmp_path / str(n_ctx)
        folder.mkdir()
        store = write_cache(folder, n_ctx=n_ctx, shard_tokens=256)
        with LargestTensor() as seen:
            _, corpus = streamed_table(store, batch_size=64, window=1, chunk_rows=512, chunk_contexts=32)
        most[n_ctx] = seen.most
        assert seen.most < corpus.n_rows
    # set by the batch, the shard, the chunks and the per-latent tables, not by the corpus
    assert most[6000] <= 1.2 * most[600]
    # the probe sees a per-row array: the in-memory corpus of the same rows holds one
    rows = torch.arange(corpus.n_rows)
    with LargestTensor() as seen:
        corpus_in_memory = TensorRows(rows // 20, rows % 20, torch.zeros(corpus.n_rows // 20 + 1, 20))
        corpus_in_memory.rows_at(torch.tensor([3]), torch.tensor([4]))
    assert seen.most >= corpus.n_rows
