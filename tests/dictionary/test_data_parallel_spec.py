"""`nproc_per_node` in the spec: validated, fingerprinted, and trained by the train stage under torchrun.

The pipeline's torchrun launch (gloo, two CPU processes) must give the weights of one process accumulating the
same micro-batches of the cache's training rows (`train_data_parallel(..., world_size=2)`), and register them
as a single-process training is registered: folder, catalog row, lineage, MLflow metrics. A failing rank's
error must reach the user.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from pydantic import TypeAdapter, ValidationError
from safetensors.torch import load_file

from featureatlas.schemas.methods import DATA_PARALLEL_METHODS, DictionaryConfig, ReLUConfig, TopKConfig
from featureatlas.schemas.spec import SpecError, parse_spec
from featureatlas.tasks.common.store import ActivationCache
from featureatlas.tasks.dictionary.distributed import _check_method, train_data_parallel
from featureatlas.tasks.dictionary.launch import DataParallelError
from featureatlas.tasks.dictionary.registry import METHODS
from featureatlas.tasks.dictionary.task import sweep_groups
from featureatlas.tasks.tracking.catalog import open_catalog
from featureatlas.tasks.tracking.identity import Identity, dictionary_identity
from tests.flows.test_pipeline import pipeline, tiny_spec  # noqa: F401  (fixture)

DDP = {"method": "topk", "d_sae": 64, "k": 4, "batch_size": 128, "steps": 12, "log_every": 4}


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"method": "gba", "d_sae": 64}, "method 'gba' cannot train data-parallel"),
        ({"method": "ba", "d_sae": 64}, "method 'ba' cannot train data-parallel"),
        ({"method": "snmf", "d_sae": 64}, "method 'snmf' cannot train data-parallel"),
        ({"method": "topk", "batch_size": 100, "nproc_per_node": 3}, "use a multiple of 3, e.g. 99"),
        ({"method": "topk", "autocast": "bf16"}, "does not support autocast yet"),
        ({"method": "topk", "nproc_per_node": 0}, "greater than or equal to 1"),
    ],
)
def test_the_spec_refuses_what_cannot_train_data_parallel(tmp_path, entry, message):
    raw = tiny_spec(tmp_path, dictionaries=[{"nproc_per_node": 2} | entry])
    with pytest.raises(SpecError, match=message):
        parse_spec(raw)


def test_the_schema_allows_exactly_the_methods_the_trainer_accepts():
    for method in METHODS:
        cfg = TypeAdapter(DictionaryConfig).validate_python({"method": method, "d_sae": 64})
        try:
            _check_method(cfg)
            accepted = True
        except ValueError:
            accepted = False
        assert accepted == (method in DATA_PARALLEL_METHODS), method


def test_the_process_count_is_in_the_fingerprint_only_above_one():
    cache = Identity("activation_cache", "cache-x", "f" * 64)

    def fp(**kw):
        return dictionary_identity(cache, "h", TopKConfig(**kw)).fingerprint

    # 1 is left out of dumps: every single-process dictionary keeps the fingerprint it had
    assert fp(nproc_per_node=1) == fp() and "nproc_per_node" not in TopKConfig().model_dump()
    # a 2-process dictionary is another result (per-process loss normalisation), so another artifact
    assert fp(nproc_per_node=2) != fp() and fp(nproc_per_node=2) != fp(nproc_per_node=4)


def test_a_data_parallel_entry_trains_alone_in_a_sweep():
    plain = TopKConfig(d_sae=64, k=4, batch_size=128)
    wide = TopKConfig(d_sae=128, k=4, batch_size=128)
    ddp = TopKConfig(d_sae=64, k=4, batch_size=128, nproc_per_node=2)
    groups = sweep_groups([("h", plain), ("h", ddp), ("h", wide)])
    assert [cfgs for _, cfgs in groups] == [[plain, wide], [ddp]]


@pytest.mark.slow  # a flow run and a torchrun launch of two processes (~40 s on 2 loaded cores)
def test_the_pipeline_trains_nproc_2_under_torchrun_and_registers_it(tmp_path, home, pipeline):  # noqa: F811
    off = {"evaluate": {"enabled": False}, "label": {"enabled": False}}
    entry = DDP | {"nproc_per_node": 2, "device": "cpu"}
    result = pipeline(parse_spec(tiny_spec(tmp_path, dictionaries=[entry], **off)))
    ref = result.dictionaries[0].dictionary
    folder = Path(ref.path)

    # the same files as a single-process training, its config recording the two processes
    assert sorted(p.name for p in folder.iterdir()) == ["cfg.json", "weights.safetensors"]
    assert json.loads((folder / "cfg.json").read_text())["nproc_per_node"] == 2

    # the weights of one process accumulating the same two micro-batches of the cache's training rows
    store = ActivationCache(result.cache.path)
    acts = store.load(ref.hookpoint, store.select_rows("train"))
    cfg = TopKConfig(**entry)
    reference = train_data_parallel(cfg, acts, world_size=2).dictionary.state_dict()
    weights = load_file(folder / "weights.safetensors")
    assert weights.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(weights[key], reference[key], rtol=1e-4, atol=1e-5)

    # catalog row and lineage, as for any dictionary
    catalog = open_catalog(home.catalog)
    assert catalog.find("dictionary", ref.fingerprint)["id"] == ref.id
    assert (ref.id, result.cache.id) in set(catalog.edges())
    assert (
        ref.fingerprint
        == dictionary_identity(
            Identity("activation_cache", result.cache.id, result.cache.fingerprint), ref.hookpoint, cfg
        ).fingerprint
    )

    # MLflow: the metrics of every logged step, the training figures and the config's params
    client = MlflowClient(home.mlflow_uri)
    run = client.get_run(ref.mlflow_run_id)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "fvu")] == [1 * 4, 2 * 4, 3 * 4]
    assert {"loss", "mse", "fvu", "l0", "dead_fraction", "auxk_loss", "lr", "train_seconds"} <= set(
        run.data.metrics
    )
    assert run.data.metrics["train_tokens"] == acts.shape[0]
    assert run.data.params["nproc_per_node"] == "2"
    assert run.data.metrics["l0"] == pytest.approx(4.0)  # topk: exactly k latents fire on every row
    assert ref.final_metrics["fvu"] == pytest.approx(run.data.metrics["fvu"])

    # and, like any dictionary, the same spec again reuses it instead of launching torchrun
    again = pipeline(parse_spec(tiny_spec(tmp_path, dictionaries=[entry], **off))).dictionaries[0].dictionary
    assert again.reused and again.id == ref.id


@pytest.mark.slow  # a torchrun launch of two processes (~20 s on 2 loaded cores)
def test_a_failing_rank_fails_the_stage_with_its_error(tmp_path, home):
    from featureatlas.tasks.dictionary.task import train_dictionaries_task
    from tests.dictionary.stages import HOOKPOINT, build_cache

    ctx, cache = build_cache(tmp_path, home)
    cfg = ReLUConfig(d_sae=32, lr=50.0, batch_size=64, steps=60, log_every=1, device="cpu", nproc_per_node=2)
    # the rank's own error heads the message, the end of torchrun's output follows
    headline = r"code 1: rank \d raised FloatingPointError: relu \(d_sae=32\): loss .* at step \d+"
    with pytest.raises(DataParallelError, match=headline):
        train_dictionaries_task.fn(ctx, cache, HOOKPOINT, [cfg])
    assert "dictionary" not in {kind for kind, _ in open_catalog(home.catalog).list()}


def test_a_mismatched_process_count_is_refused():
    from featureatlas.tasks.dictionary.distributed import _with_world_size

    assert _with_world_size(TopKConfig(batch_size=128), 4).nproc_per_node == 4
    with pytest.raises(ValueError, match="launch with --nproc-per-node 2"):
        _with_world_size(TopKConfig(batch_size=128, nproc_per_node=2), 4)
    with pytest.raises(ValidationError):
        _with_world_size(TopKConfig(batch_size=126), 4)  # 126 rows do not split over 4
