"""A sweep's members fail independently: the others are trained, evaluated and labeled, and the result lists
what failed; the CLI ends with a summary and exit code 1."""

from __future__ import annotations

import pytest
from prefect import flow, task

from featureatlas.schemas.settings import Settings
from featureatlas.schemas.spec import parse_spec
from featureatlas.tasks.tracking.fanout import task_pool
from featureatlas.tasks.tracking.members import settle, summary
from tests.flows.test_pipeline import tiny_spec


@task
def half(x: int) -> float:
    if x == 2:
        raise ValueError(f"member {x} cannot be halved\nsecond line of detail")
    return x / 2


@pytest.mark.parametrize("workers", ["1", "2"])
def test_run_each_keeps_the_other_members(prefect_harness, monkeypatch, workers):  # noqa: ARG001
    monkeypatch.setenv("FEATUREATLAS_MAX_WORKERS", workers)

    @flow
    def batch() -> tuple:
        with task_pool(Settings()) as pool:
            return settle("half", ["a", "b", "c"], pool.run_each(half, [{"x": 1}, {"x": 2}, {"x": 4}]))

    results, failures = batch()
    assert results == [0.5, None, 2.0]
    assert [(f.stage, f.member, f.error) for f in failures] == [("half", "b", "member 2 cannot be halved")]


def test_settle_fails_when_every_member_failed():
    with pytest.raises(ValueError, match="all gone"):
        settle("evaluate_dictionary", ["a"], [ValueError("all gone")])


@pytest.mark.slow
def test_a_diverging_member_leaves_the_others_trained_evaluated_and_labeled(tmp_path, home, prefect_harness):  # noqa: ARG001
    from featureatlas.flows.pipeline import pipeline_flow

    sweep = [
        {"method": "topk", "d_sae": 64, "k": 4, "batch_size": 256, "epochs": 2},
        # its own sweep group (another seed), and a learning rate that makes training diverge
        {"method": "topk", "d_sae": 32, "k": 4, "batch_size": 256, "epochs": 2, "seed": 1, "lr": 1e6},
    ]
    result = pipeline_flow(parse_spec(tiny_spec(tmp_path, dictionaries=sweep)))
    [ok] = result.dictionaries
    assert ok.dictionary.d_sae == 64 and ok.evaluation is not None and ok.labeling is not None
    [failed] = result.failures
    assert failed.stage == "train_dictionary" and failed.member == "topk d_sae=32 k=4, model.layers.1"
    assert "lower the learning rate" in failed.error
    lines = summary(result)
    assert lines[0].startswith(f"ok      {ok.dictionary.id}") and "evaluated, labeled" in lines[0]
    assert lines[1].startswith("FAILED  train_dictionary [topk d_sae=32 k=4, model.layers.1]")
