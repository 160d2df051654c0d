"""A sweep, and a cache in parts, fanned out over threads and over a local Dask cluster give what the
sequential run gives: the same ids and weights, and the same cache files byte for byte."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from prefect import flow, task
from safetensors.torch import load_file

from featureatlas.schemas.settings import Settings
from featureatlas.schemas.spec import parse_spec
from featureatlas.tasks.tracking.catalog import open_catalog
from featureatlas.tasks.tracking.fanout import dask_worker_config, task_pool, task_runner_for
from tests.flows.test_pipeline import tiny_spec

# two hookpoints x two methods: two sweep groups (one pass over the cache each), four dictionaries
HOOKPOINTS = ["model.layers.0", "model.layers.1"]
SWEEP = [
    {"method": "topk", "d_sae": 64, "k": 4, "batch_size": 256, "epochs": 1},
    {"method": "relu", "d_sae": 64, "l1_coef": 1.0, "batch_size": 256, "epochs": 1},
]


def test_task_runner_choice(tmp_path):
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    assert task_runner_for(Settings(home=tmp_path)) is None  # one worker: called in turn
    assert isinstance(task_runner_for(Settings(home=tmp_path, max_workers=3)), ThreadPoolTaskRunner)
    dask = task_runner_for(Settings(home=tmp_path, task_runner="dask", dask_address="tcp://127.0.0.1:1"))
    assert isinstance(dask, DaskTaskRunner)


@task
def _where(i: int) -> tuple[int, int, bool]:
    import dask

    return i, os.getpid(), dask.config.get("distributed.worker.profile.enabled")


@pytest.mark.slow
def test_local_dask_cluster_runs_tasks_in_its_worker_processes_in_order(tmp_path, prefect_harness):  # noqa: ARG001
    settings = Settings(home=tmp_path, task_runner="dask", max_workers=2)  # no address: a LocalCluster

    @flow
    def fan() -> list[tuple[int, int, bool]]:
        with task_pool(settings) as pool:
            return pool.run_all(_where, [{"i": i} for i in range(6)])

    got = fan()
    assert [i for i, _, _ in got] == list(range(6))  # results in call order
    assert os.getpid() not in {pid for _, pid, _ in got}  # ran in the cluster's worker processes
    # with the stack-sampling profiler off (it can deadlock a worker on Python < 3.12)
    assert {profiling for _, _, profiling in got} == {False}


def _run(pipeline, spec, home: Path, monkeypatch, **env) -> tuple[object, dict]:
    monkeypatch.setenv("FEATUREATLAS_HOME", str(home))
    for key, value in env.items():
        monkeypatch.setenv(f"FEATUREATLAS_{key.upper()}", str(value))
    result = pipeline(spec)
    weights = {
        d.dictionary.id: load_file(Path(d.dictionary.path) / "weights.safetensors")
        for d in result.dictionaries
    }
    for key in env:
        monkeypatch.delenv(f"FEATUREATLAS_{key.upper()}")
    return result, weights


def _cache_files(result) -> dict[str, bytes]:
    folder = Path(result.cache.path)
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _same(a, wa, b, wb) -> None:
    assert a.cache.id == b.cache.id and _cache_files(a) == _cache_files(b)
    assert [d.dictionary.id for d in a.dictionaries] == [d.dictionary.id for d in b.dictionaries]
    assert [d.evaluation.id for d in a.dictionaries] == [d.evaluation.id for d in b.dictionaries]
    assert [d.evaluation.fvu for d in a.dictionaries] == pytest.approx(
        [d.evaluation.fvu for d in b.dictionaries], rel=1e-5
    )
    assert wa.keys() == wb.keys()
    for key in wa:
        for name in wa[key]:
            torch.testing.assert_close(wa[key][name], wb[key][name], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_sweep_fans_out_over_threads_and_dask_with_sequential_results(tmp_path, monkeypatch, prefect_harness):  # noqa: ARG001
    from distributed import Client, LocalCluster, get_task_stream

    from featureatlas.flows.pipeline import pipeline_flow

    raw = tiny_spec(tmp_path, hookpoints=HOOKPOINTS, dictionaries=SWEEP, label={"enabled": False})
    spec = parse_spec(raw)
    seq, w_seq = _run(pipeline_flow, spec, tmp_path / "sequential", monkeypatch)
    assert len(seq.dictionaries) == 4 and len(set(w_seq)) == 4
    # the fanned-out runs cache in two parts (the tiny corpus makes 7 full shards of 512 rows and a tail)
    spec = parse_spec(raw | {"cache": raw["cache"] | {"parts": 2}})

    threads, w_threads = _run(pipeline_flow, spec, tmp_path / "threads", monkeypatch, max_workers=2)
    _same(seq, w_seq, threads, w_threads)

    with (
        dask_worker_config(),
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
        get_task_stream(client) as stream,
    ):
        dask, w_dask = _run(
            pipeline_flow,
            spec,
            tmp_path / "dask",
            monkeypatch,
            task_runner="dask",
            dask_address=cluster.scheduler_address,
        )
        workers = set(client.scheduler_info()["workers"])
    _same(seq, w_seq, dask, w_dask)
    # the 2 cache parts, 2 sweep groups and 4 evaluations ran as tasks on the cluster's worker processes
    assert len(stream.data) >= 8
    assert {t["worker"] for t in stream.data} <= workers and len(workers) == 2
    # and they wrote their rows into the run's own catalog, with lineage, as the sequential run did
    catalog = open_catalog(Settings(home=tmp_path / "dask").catalog)
    ids = {r.id for _, r in catalog.list()}
    assert {d.dictionary.id for d in dask.dictionaries} | {d.evaluation.id for d in dask.dictionaries} <= ids
    assert len(ids) == 3 + 4 + 4
    assert not dask.dictionaries[0].dictionary.reused


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_sweep_fanned_out_over_threads_writes_every_row_and_run_to_postgresql(
    tmp_path,
    backend,  # noqa: ARG001
    monkeypatch,
    prefect_harness,  # noqa: ARG001
):
    """The concurrent writers (two threads' stages racing on one new MLflow dataset, the cache) on PostgreSQL.

    Only the threads arm runs here: the Dask arm writes through the same code from processes and costs
    minutes more; the results equal the sequential run's on SQLite (the test above).
    """
    from featureatlas.flows.pipeline import pipeline_flow

    raw = tiny_spec(tmp_path, hookpoints=HOOKPOINTS, dictionaries=SWEEP, label={"enabled": False})
    result, weights = _run(pipeline_flow, parse_spec(raw), tmp_path / "threads", monkeypatch, max_workers=2)
    assert len(weights) == 4
    settings = Settings(home=tmp_path / "threads")
    catalog = open_catalog(settings.catalog)
    assert catalog.engine.dialect.name == "postgresql"
    assert len(catalog.list()) == 3 + 4 + 4
    for d in result.dictionaries:
        assert catalog.parents(d.dictionary.id) == [result.cache.id]
        assert catalog.parents(d.evaluation.id) == sorted([d.dictionary.id, result.cache.id])
    client = MlflowClient(settings.mlflow_uri)
    exp = client.get_experiment_by_name(settings.experiment)
    children = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{result.mlflow_run_id}'"
    )
    stages = [r.data.tags["featureatlas.stage"] for r in children]
    assert sorted(stages) == sorted(
        ["model", "corpus", "activation_cache"] + ["dictionary", "evaluation"] * 4
    )
    assert {r.info.status for r in children} == {"FINISHED"}
    dictionary_runs = [r for r in children if r.data.tags["featureatlas.stage"] == "dictionary"]
    assert all(
        [i.dataset.name for i in r.inputs.dataset_inputs] == [result.cache.id] for r in dictionary_runs
    )
