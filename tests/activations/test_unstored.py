"""An unstored cache (`cache.store: false`): shards recomputed from the model hold the stored bytes, training
streams forward passes into the dictionaries with the result of training on the stored cache, and a killed
streaming run resumes to the same weights without rerunning the forward passes it no longer needs."""

from __future__ import annotations

import json

import pytest
import torch

from featureatlas.schemas.methods import ReLUConfig, TopKConfig
from featureatlas.schemas.spec import CacheSpec, CorpusSpec
from featureatlas.tasks.activations.cache import plan_cache, write_cache
from featureatlas.tasks.activations.unstored import write_unstored
from featureatlas.tasks.common.corpus import load_documents
from featureatlas.tasks.common.models import LoadedModel
from featureatlas.tasks.common.store import ActivationCache
from featureatlas.tasks.dictionary.checkpoint import latest
from featureatlas.tasks.dictionary.data import CacheSource
from featureatlas.tasks.dictionary.train import train_dictionaries, train_dictionary
from tests.helpers import TINY_TEXT, build_tiny_llama, build_tiny_tokenizer

HOOKPOINTS = ["model.layers.0", "model.layers.1"]


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("unstored")
    path = tmp / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": " ".join(TINY_TEXT[i : i + 6])}) for i in range(16)))
    corpus = CorpusSpec(
        sources=[str(path)], context_length=16, max_tokens=1200, heldout_fraction=0.2, min_context_tokens=4
    )
    loaded = LoadedModel(build_tiny_llama(), build_tiny_tokenizer(bos=True), torch.device("cpu"))
    docs = load_documents(corpus)
    spec = CacheSpec(shard_tokens=96, batch_size=3)
    write_cache(loaded, docs, corpus, spec, HOOKPOINTS, tmp / "stored", header={"model_id": "m"})
    plan = plan_cache(loaded, docs, corpus, spec, HOOKPOINTS, header={"model_id": "m"})
    write_unstored(loaded, docs, plan, spec.model_copy(update={"store": False}), tmp / "unstored", header={})
    return loaded, tmp / "stored", tmp / "unstored"


def _open(loaded, folder):
    store = ActivationCache(folder)
    if not store.stored:
        store.attach_model(loaded)
    return store


def test_recomputed_shards_hold_the_stored_bytes(caches):
    loaded, stored_dir, unstored_dir = caches
    stored, unstored = ActivationCache(stored_dir), _open(loaded, unstored_dir)
    assert not unstored.stored and not any(unstored_dir.glob("acts/**/*.safetensors"))
    assert unstored.tokens.equals(stored.tokens)
    for hp in HOOKPOINTS:
        assert unstored.n_shards(hp) == stored.n_shards(hp) >= 5
        for s in (0, 2, stored.n_shards(hp) - 1):  # a middle shard starts inside a batch of contexts
            assert torch.equal(unstored.read_shard(hp, s), stored.read_shard(hp, s))
    rows = stored.select_rows("heldout")
    assert torch.equal(unstored.load("model.layers.1", rows), stored.load("model.layers.1", rows))
    # the contexts stay on disk: the reader keeps one row offset per batch of contexts, no token ids
    held = [v for v in vars(unstored.recompute).values() if isinstance(v, torch.Tensor)]
    n_batches = -(-unstored.manifest["n_contexts"] // unstored.manifest["batch_size"])
    assert held and max(t.numel() for t in held) == n_batches + 1 < unstored.manifest["n_tokens"] // 8
    seen = unstored.recompute.seen("model.layers.0")
    assert seen["rows"] > 0 and len(seen["mean"]) == stored.manifest["hookpoints"]["model.layers.0"]["d_in"]


def test_streaming_training_equals_training_on_the_stored_cache(caches):
    loaded, stored_dir, unstored_dir = caches
    cfgs = [
        TopKConfig(d_sae=64, k=4, batch_size=32, epochs=2, seed=3, device="cpu", log_every=5),
        ReLUConfig(d_sae=48, l1_coef=1.0, batch_size=32, epochs=2, seed=3, device="cpu", log_every=5),
    ]
    hp = "model.layers.1"
    from_cache = train_dictionaries(cfgs, CacheSource(ActivationCache(stored_dir), hp))
    # one pass of forward passes feeds both dictionaries
    streamed = train_dictionaries(cfgs, CacheSource(_open(loaded, unstored_dir), hp))
    for a, b in zip(from_cache, streamed, strict=True):
        sa, sb = a.dictionary.state_dict(), b.dictionary.state_dict()
        for name in sa:
            torch.testing.assert_close(sa[name], sb[name], rtol=1e-5, atol=1e-6)
        assert a.steps == b.steps
    assert from_cache[0].final_metrics["fvu"] < 0.9


def test_a_killed_streaming_run_resumes_to_the_same_weights(caches, tmp_path):
    loaded, _, unstored_dir = caches
    hp = "model.layers.0"
    cfg = TopKConfig(d_sae=32, k=4, batch_size=24, steps=40, checkpoint_every=10, log_every=5, device="cpu")
    fresh = _open(loaded, unstored_dir)
    whole = train_dictionary(cfg, CacheSource(fresh, hp, buffer_shards=1))

    def stop_at_35(_metrics, step):
        if step == 35:
            raise KeyboardInterrupt  # a kill after the checkpoint of step 30

    folder = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):
        train_dictionary(
            cfg,
            CacheSource(_open(loaded, unstored_dir), hp, buffer_shards=1),
            on_metrics=stop_at_35,
            checkpoint_dir=folder,
        )
    assert latest(folder).step == 30
    store = _open(loaded, unstored_dir)
    resumed = train_dictionary(cfg, CacheSource(store, hp, buffer_shards=1), checkpoint_dir=folder)
    for name, value in whole.dictionary.state_dict().items():
        assert torch.equal(value, resumed.dictionary.state_dict()[name]), name
    assert resumed.final_metrics == whole.final_metrics
    # the resumed run ran the forward passes of the shards its last 10 steps read, not those of the whole
    # run (the initial data sample and every epoch: 2,994 forward tokens here, against 799 resumed)
    assert store.recompute.forward_tokens < 0.5 * fresh.recompute.forward_tokens


def test_the_data_sample_shards_are_not_recomputed_by_the_first_epoch(caches):
    loaded, _, unstored_dir = caches
    hp = "model.layers.0"
    once = _open(loaded, unstored_dir).recompute
    for s in range(-(-once.n_rows // once.T)):  # every shard read once, in order: one pass of the corpus
        once.shard(hp, s)
    cfg = TopKConfig(d_sae=32, k=4, batch_size=24, epochs=1, log_every=5, device="cpu")
    held = _open(loaded, unstored_dir)
    train_dictionary(cfg, CacheSource(held, hp, buffer_shards=1))
    # the initial data sample read every shard (the cache is smaller than the sample), and the epoch read
    # each again: held, they ran their forward passes once (the last batch, which reaches into the second
    # epoch, may add one shard)
    assert once.forward_tokens <= held.recompute.forward_tokens <= once.forward_tokens + once.T
    unheld = _open(loaded, unstored_dir)
    unheld._recompute.hold = 0
    train_dictionary(cfg, CacheSource(unheld, hp, buffer_shards=1))
    assert unheld.recompute.forward_tokens > 1.5 * once.forward_tokens
