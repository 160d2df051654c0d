"""The training loop's data feed, sweeps and checkpoints, from Python: batches that are a pure function of
(seed, batch_size, index), a streamed cache, several dictionaries from one pass equal to each alone, a
resumed run equal to an uninterrupted one, and bad activations refused by name."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from featureatlas.schemas.methods import BAConfig, JumpReLUConfig, MPConfig, ReLUConfig, TopKConfig
from featureatlas.schemas.spec import CacheSpec, CorpusSpec
from featureatlas.tasks.activations.cache import write_cache
from featureatlas.tasks.common.corpus import load_documents
from featureatlas.tasks.common.models import LoadedModel
from featureatlas.tasks.common.shards import write_acts_shard
from featureatlas.tasks.common.store import ActivationCache
from featureatlas.tasks.dictionary.checkpoint import latest
from featureatlas.tasks.dictionary.data import BadActivations, CacheSource, TensorSource, batches
from featureatlas.tasks.dictionary.train import train_dictionaries, train_dictionary
from tests.dictionary.test_topk import plant
from tests.helpers import TINY_TEXT, build_tiny_llama, build_tiny_tokenizer

HOOKPOINT = "model.layers.0"


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("loop")
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
        [HOOKPOINT],
        tmp / "cache",
        header={"model_id": "m"},
    )
    return tmp / "cache"


def _count_reads(monkeypatch) -> list[int]:
    reads: list[int] = []
    real = ActivationCache.read_shard

    def counting(self, hookpoint, index):
        reads.append(index)
        return real(self, hookpoint, index)

    monkeypatch.setattr(ActivationCache, "read_shard", counting)
    return reads


def _state(result) -> dict[str, torch.Tensor]:
    return dict(result.dictionary.named_parameters()) | dict(result.dictionary.named_buffers())


def assert_same(a, b) -> None:
    sa, sb = _state(a), _state(b)
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name
    assert a.final_metrics == b.final_metrics and a.steps == b.steps


def test_tensor_batches_straddle_epochs_and_restart_anywhere():
    # 5 rows, batches of 2: epoch 0 is one permutation of 0..4, epoch 1 the generator's next; batch 2
    # holds the last row of epoch 0 and the first of epoch 1.
    acts = torch.arange(5.0).repeat(3, 1).T  # row i = (i, i, i)
    source = TensorSource(acts)
    gen = torch.Generator().manual_seed(7)
    order = torch.cat([torch.randperm(5, generator=gen), torch.randperm(5, generator=gen)])
    feed = batches(source, 2, seed=7)
    got = [next(feed)[:, 0].long() for _ in range(5)]
    assert torch.equal(torch.cat(got), order)
    # restarting at batch 3 gives batches 3 and 4 of the uninterrupted feed
    late = batches(source, 2, seed=7, start=3)
    assert torch.equal(next(late)[:, 0].long(), got[3]) and torch.equal(next(late)[:, 0].long(), got[4])


def test_cache_stream_feeds_every_row_once_per_epoch_with_bounded_sample(cache_dir, monkeypatch):
    store = ActivationCache(cache_dir)
    source = CacheSource(store, HOOKPOINT, buffer_shards=2)
    rows = store.select_rows("train")
    assert source.n_rows == rows.numel() and source.d_in == 32
    full = store.load(HOOKPOINT)[rows]
    n = source.n_rows
    feed = batches(source, 50, seed=1)
    epoch0 = torch.cat([next(feed) for _ in range(n // 50 + 1)])[:n]
    # the first n rows fed are the training rows, each once (compared as multisets: sorted by a projection)
    probe = torch.randn(32, dtype=torch.float64)

    def by_projection(x):
        return x[(x.double() @ probe).argsort()]

    assert torch.equal(by_projection(epoch0), by_projection(full))
    # resuming at batch 4 reproduces batch 4 on
    feed = batches(source, 50, seed=1)
    expected = [next(feed) for _ in range(7)][4:]
    late = batches(source, 50, seed=1, start=4)
    for b in expected:
        assert torch.equal(next(late), b)
    # the init sample reads whole shards only until it has its rows, never the whole cache
    reads = _count_reads(monkeypatch)
    sample = source.init_sample(max_rows=100)
    assert sample.shape == (100, 32) and len(reads) <= 5 < len(
        store.manifest["hookpoints"][HOOKPOINT]["shards"]
    )
    assert all((full == row).all(1).any() for row in sample[:10])  # real training rows


def test_a_sweep_reads_the_stream_once_and_equals_each_dictionary_alone(cache_dir, monkeypatch):
    store = ActivationCache(cache_dir)
    base = dict(batch_size=32, epochs=2, seed=3, device="cpu", log_every=3)
    cfgs = [
        TopKConfig(d_sae=64, k=4, **base),
        ReLUConfig(d_sae=96, l1_coef=1.0, l1_warmup_steps=5, **base),
        BAConfig(d_sae=64, update_every=4, **base),
    ]
    reads = _count_reads(monkeypatch)

    def no_loading(*_args, **_kwargs):
        raise AssertionError("the streaming path must never load the whole split")

    monkeypatch.setattr(ActivationCache, "load", no_loading)
    alone = [train_dictionary(cfg, CacheSource(store, HOOKPOINT)) for cfg in cfgs]
    reads_alone = len(reads)
    reads.clear()
    together = train_dictionaries(cfgs, CacheSource(store, HOOKPOINT))
    assert len(reads) == reads_alone / 3  # one pass (and one init sample) instead of three
    for a, b in zip(alone, together):
        assert_same(a, b)
    assert together[0].final_metrics["fvu"] < 0.9  # it did learn something


def test_a_sweep_refuses_members_that_read_different_batches():
    cfgs = [TopKConfig(d_sae=32, k=2, batch_size=32), TopKConfig(d_sae=32, k=2, batch_size=64)]
    with pytest.raises(ValueError, match="must share batch_size, seed and device"):
        train_dictionaries(cfgs, plant(100).acts)


@pytest.mark.parametrize(
    "cfg",
    [
        TopKConfig(d_sae=64, k=4, dead_tokens=100, auxk_coef=0.1),
        ReLUConfig(d_sae=64, l1_warmup_steps=12, warmup_steps=3, decay_fraction=0.3),
        BAConfig(d_sae=64, update_every=4),
        JumpReLUConfig(d_sae=64),
        MPConfig(d_sae=64, k=3),
    ],
    ids=lambda c: c.method,
)
def test_resuming_from_a_checkpoint_equals_an_uninterrupted_run(tmp_path, cfg):
    cfg = cfg.model_copy(update=dict(batch_size=40, steps=24, checkpoint_every=10, log_every=4, device="cpu"))
    acts = plant(300).acts
    whole = train_dictionary(cfg, acts)

    logged: dict[int, float] = {}

    def stop_at_16(metrics, step):
        logged[step] = metrics["loss"]
        if step == 16:
            raise KeyboardInterrupt  # a Ctrl-C after the checkpoint of step 10

    folder = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):
        train_dictionary(cfg, acts, on_metrics=stop_at_16, checkpoint_dir=folder)
    assert latest(folder).step == 10
    resumed_steps: list[int] = []
    resumed = train_dictionary(
        cfg, acts, on_metrics=lambda _m, s: resumed_steps.append(s), checkpoint_dir=folder
    )
    assert resumed_steps == [12, 16, 20, 24]  # metrics continue after the checkpoint's step
    assert_same(whole, resumed)
    assert latest(folder).step == 20


def test_a_checkpoint_of_another_shape_is_refused(tmp_path):
    acts = plant(200).acts
    cfg = TopKConfig(d_sae=32, k=2, batch_size=40, steps=12, checkpoint_every=5, device="cpu")
    with pytest.raises(KeyboardInterrupt):
        train_dictionary(cfg, acts, checkpoint_dir=tmp_path, on_metrics=_interrupt_at(10))
    with pytest.raises(ValueError, match=r"checkpoint .* holds \(method, d_in, d_sae\) = \('topk', 32, 32\)"):
        train_dictionary(cfg, acts[:, :16], checkpoint_dir=tmp_path)


def _interrupt_at(stop: int):
    def callback(_metrics, step):
        if step >= stop:
            raise KeyboardInterrupt

    return callback


def test_divergence_keeps_the_last_good_checkpoint(tmp_path):
    # lr 50 blows a ReLU SAE up within a few steps; the checkpoint before the blow-up stays
    cfg = ReLUConfig(
        d_sae=32, lr=50.0, batch_size=40, steps=60, checkpoint_every=1, log_every=1, device="cpu"
    )
    with pytest.raises(
        FloatingPointError, match=r"relu \(d_sae=32\): loss (diverged|became nan) at step \d+"
    ):
        train_dictionary(cfg, plant(200).acts, checkpoint_dir=tmp_path)
    found = latest(tmp_path)
    assert found is not None
    state = json.loads((found.folder / "state.json").read_text())
    assert all(torch.isfinite(torch.tensor(v)).all() for v in state["metrics"].values())


def test_nan_in_a_shard_is_named(cache_dir, tmp_path):
    broken = tmp_path / "cache"
    shutil.copytree(cache_dir, broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    shard = manifest["hookpoints"][HOOKPOINT]["shards"][2]
    store = ActivationCache(broken, verify=False)
    acts, store_rows = store.read_shard(HOOKPOINT, 2).clone(), store.select_rows("train")
    shard_tokens = manifest["shard_tokens"]
    train = store_rows[(store_rows // shard_tokens) == 2]  # a training row of that shard
    acts[int(train[0]) - 2 * shard_tokens, 3] = float("nan")
    shard["sha256"] = write_acts_shard(acts, broken / shard["file"])
    shard["bytes"] = (broken / shard["file"]).stat().st_size
    (broken / "manifest.json").write_text(json.dumps(manifest))
    cfg = TopKConfig(d_sae=32, k=2, batch_size=32, epochs=1, device="cpu")
    with pytest.raises(BadActivations, match=r"shard acts/model.layers.0/00002.safetensors .* NaN or inf"):
        train_dictionary(cfg, CacheSource(ActivationCache(broken), HOOKPOINT))


def test_materialize_and_the_init_sample_hold_the_selected_rows(cache_dir):
    """The per-shard selection gives the train split in row order (materialize) and a sample of it."""
    store = ActivationCache(cache_dir)
    rows, full = store.select_rows("train"), store.load(HOOKPOINT)
    source = CacheSource(store, HOOKPOINT)
    assert torch.equal(source.materialize(), full[rows])
    sample = source.init_sample(max_rows=40)
    assert sample.shape[0] == 40
    assert bool((sample[:, None, :] == full[rows][None]).all(-1).any(1).all())  # each a selected row


def test_the_shard_check_passes_large_finite_half_values_and_names_an_inf(cache_dir):
    """Each shard is checked once as it is read, by a float32 sum: finite fp16 rows whose sum is far past
    fp16's range pass; one inf, or a wrong width, is refused naming the shard's file."""
    source = CacheSource(ActivationCache(cache_dir), HOOKPOINT)
    big = torch.full((4096, source.d_in), 60000.0, dtype=torch.float16)
    source.check_shard(1, big)
    big[7, 0] = float("inf")
    with pytest.raises(BadActivations, match=r"shard acts/model.layers.0/00001.safetensors .* NaN or inf"):
        source.check_shard(1, big)
    with pytest.raises(BadActivations, match=r"00001.safetensors of .* has width 2"):
        source.check_shard(1, big[:2, :2])


def test_an_empty_training_split_is_refused(cache_dir):
    store = ActivationCache(cache_dir)
    with pytest.raises(BadActivations, match="holds 0 training row.*heldout_fraction"):
        CacheSource(store, HOOKPOINT, rows=torch.empty(0, dtype=torch.long))


def test_tensor_input_is_still_checked():
    acts = plant(100).acts
    acts[17, 0] = float("inf")
    with pytest.raises(BadActivations, match="acts row 17 holds NaN or inf"):
        train_dictionary(TopKConfig(d_sae=32, k=2, device="cpu"), acts)
