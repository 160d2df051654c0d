"""The dictionary stage on a real cache, catalog and MLflow store: a sweep from one pass with a run and a row
per dictionary, reuse by fingerprint, a real SIGKILL mid-training resumed in the same MLflow run to the
uninterrupted result, and bad input that stops the stage by name, keeping checkpoints, registering nothing."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from featureatlas.schemas.methods import ReLUConfig, TopKConfig
from featureatlas.schemas.settings import Settings
from featureatlas.schemas.spec import SpecError, parse_spec
from featureatlas.tasks.common.shards import write_acts_shard
from featureatlas.tasks.common.store import ActivationCache
from featureatlas.tasks.dictionary import load_dictionary
from featureatlas.tasks.dictionary.data import BadActivations, CacheSource
from featureatlas.tasks.dictionary.task import CHECKPOINTS, train_dictionaries_task
from featureatlas.tasks.dictionary.train import train_dictionary
from featureatlas.tasks.tracking.catalog import open_catalog
from featureatlas.tasks.tracking.identity import dictionary_identity, ref_identity
from tests.dictionary.stages import HOOKPOINT, build_cache
from tests.dictionary.train_worker import run as run_worker


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage")
    settings = Settings(home=root / "home")
    ctx, cache = build_cache(root, settings)
    return root, settings, ctx, cache


def _cfg(**overrides) -> TopKConfig:
    return TopKConfig(**{"d_sae": 64, "k": 4, "batch_size": 64, "epochs": 1, "device": "cpu"} | overrides)


def _partial(settings: Settings, cache, cfg) -> Path:
    ident = dictionary_identity(ref_identity(cache), HOOKPOINT, cfg)
    return settings.artifacts_dir / "dictionary" / f"{ident.id}.partial"


def _registered(settings: Settings, cache, cfg) -> bool:
    ident = dictionary_identity(ref_identity(cache), HOOKPOINT, cfg)
    return open_catalog(settings.catalog).find("dictionary", ident.fingerprint) is not None


def _reads(monkeypatch) -> list[int]:
    reads: list[int] = []
    real = ActivationCache.read_shard
    monkeypatch.setattr(
        ActivationCache, "read_shard", lambda self, hp, i: reads.append(i) or real(self, hp, i)
    )
    return reads


def test_a_sweep_trains_from_one_pass_with_a_run_and_a_row_each(staged, monkeypatch):
    _, settings, ctx, cache = staged
    a, b, c = _cfg(seed=1), _cfg(seed=1, d_sae=128, k=8), _cfg(seed=1, k=2)
    reads = _reads(monkeypatch)
    alone = train_dictionary(a, CacheSource(ActivationCache(cache.path), HOOKPOINT))
    one_pass = len(reads)
    reads.clear()
    refs = train_dictionaries_task.fn(ctx, cache, HOOKPOINT, [a, b])
    assert len(reads) == one_pass  # two dictionaries, each shard read once
    assert len({r.id for r in refs}) == 2 and len({r.mlflow_run_id for r in refs}) == 2
    trained = load_dictionary(refs[0].path)
    for name, tensor in alone.dictionary.state_dict().items():
        assert torch.equal(trained.state_dict()[name], tensor), name
    assert sorted(p.name for p in Path(refs[0].path).iterdir()) == ["cfg.json", "weights.safetensors"]
    client = MlflowClient(settings.mlflow_uri)
    for ref in refs:
        assert client.get_run(ref.mlflow_run_id).data.metrics["fvu"] < 1.0
        assert _registered(settings, cache, ref.config)

    # the two already made are reused, not retrained: only the new one reads the cache
    reads.clear()
    again = train_dictionaries_task.fn(ctx, cache, HOOKPOINT, [a, b, c])
    assert [r.reused for r in again] == [True, True, False] and again[:2] == [
        r.model_copy(update={"reused": True}) for r in refs
    ]
    assert len(reads) == one_pass


def test_a_killed_sweep_resumes_in_the_same_mlflow_run_to_the_uninterrupted_result(staged):
    root, settings, _, cache = staged
    cfg = _cfg(seed=2, steps=40, checkpoint_every=5, log_every=1)
    args = {
        "home": str(settings.home_dir),
        "cache": cache.model_dump(mode="json"),
        "cfgs": [cfg.model_dump(mode="json")],
        "hookpoint": HOOKPOINT,
    }
    partial = _partial(settings, cache, cfg)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.dictionary.train_worker", json.dumps(args)],
        env=env,
        stderr=subprocess.PIPE,
        cwd=root,
    )
    deadline = time.monotonic() + 300
    while not (partial / CHECKPOINTS / "step-000000010" / "state.json").is_file():
        assert proc.poll() is None, f"the worker ended before it was killed: {proc.stderr.read().decode()}"
        assert time.monotonic() < deadline, "the worker wrote no checkpoint in time"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    assert not _registered(settings, cache, cfg)  # nothing half-made in the catalog
    run_id = (partial.parent / f"{partial.name}.run").read_text()
    client = MlflowClient(settings.mlflow_uri)
    assert client.get_run(run_id).info.status == "RUNNING"  # killed: nobody ended it
    logged_before = {m.step for m in client.get_metric_history(run_id, "loss")}
    assert {1, 10} <= logged_before and max(logged_before) < 40

    ref = run_worker(args)[0]
    assert ref.mlflow_run_id == run_id and client.get_run(run_id).info.status == "FINISHED"
    steps = sorted({m.step for m in client.get_metric_history(run_id, "loss")})
    assert steps == list(range(1, 41))  # the killed run's steps, then on from the checkpoint
    assert not partial.exists() and not (partial.parent / f"{partial.name}.run").exists()
    assert _registered(settings, cache, cfg)

    whole = train_dictionary(cfg, CacheSource(ActivationCache(cache.path), HOOKPOINT)).dictionary
    resumed = load_dictionary(ref.path)
    for name, tensor in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], tensor), name
    assert client.get_run(run_id).data.metrics["loss"] == pytest.approx(ref.final_metrics["loss"])


def test_divergence_stops_the_stage_naming_the_step_and_keeps_the_checkpoint(staged):
    _, settings, ctx, cache = staged
    cfg = ReLUConfig(
        d_sae=32, lr=50.0, batch_size=64, steps=60, checkpoint_every=1, log_every=1, device="cpu"
    )
    with pytest.raises(FloatingPointError, match=r"relu \(d_sae=32\): loss .* at step \d+") as err:
        train_dictionaries_task.fn(ctx, cache, HOOKPOINT, [cfg])
    failed_at = int(str(err.value).split("at step ")[1].split(":")[0].split(";")[0])
    assert not _registered(settings, cache, cfg)
    kept = list((_partial(settings, cache, cfg) / CHECKPOINTS).glob("step-*/state.json"))
    assert len(kept) == 1 and not (_partial(settings, cache, cfg) / "cfg.json").exists()
    assert json.loads(kept[0].read_text())["step"] == failed_at - 1  # the last good one


def test_nan_activations_stop_the_stage_naming_the_shard(staged):
    root, settings, ctx, cache = staged
    broken = root / "broken-cache"
    shutil.copytree(cache.path, broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    shard = manifest["hookpoints"][HOOKPOINT]["shards"][1]
    store = ActivationCache(broken, verify=False)
    acts, store_rows = store.read_shard(HOOKPOINT, 1).clone(), store.select_rows("train")
    shard_tokens = manifest["shard_tokens"]
    train = store_rows[(store_rows // shard_tokens) == 1]  # a training row of that shard
    acts[int(train[0]) - 1 * shard_tokens, 0] = float("inf")
    shard["sha256"] = write_acts_shard(acts, broken / shard["file"])
    shard["bytes"] = (broken / shard["file"]).stat().st_size
    (broken / "manifest.json").write_text(json.dumps(manifest))
    cfg = _cfg(seed=4)
    with pytest.raises(BadActivations, match=r"shard acts/model.layers.1/00001.safetensors .* NaN or inf"):
        train_dictionaries_task.fn(ctx, cache.model_copy(update={"path": str(broken)}), HOOKPOINT, [cfg])
    assert not _registered(settings, cache, cfg)


def test_a_cache_whose_width_changed_is_refused(staged):
    _, settings, ctx, cache = staged
    cfg = _cfg(seed=5)
    wrong = cache.model_copy(update={"d_in": {HOOKPOINT: 16}})
    with pytest.raises(BadActivations, match="records d_in=16 .* but its manifest says 32"):
        train_dictionaries_task.fn(ctx, wrong, HOOKPOINT, [cfg])
    assert not _registered(settings, cache, cfg) and not _partial(settings, cache, cfg).exists()


def test_k_above_d_sae_is_refused_in_the_spec():
    spec = {
        "name": "x",
        "model": {"path": "m"},
        "hookpoints": ["h"],
        "dictionaries": [{"method": "topk", "d_sae": 64, "k": 65}],
    }
    with pytest.raises(SpecError, match="k=65 exceeds d_sae=64; choose k <= d_sae"):
        parse_spec(spec)
