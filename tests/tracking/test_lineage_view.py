"""The experiment's MLflow view settings on a real local store: model-training kind (a kind chosen by hand is
kept), and the shared runs-table view whose columns grow with the widest sweep and keep what a user added."""

from __future__ import annotations

import json

from featureatlas.tasks.tracking.lineage import (
    EXPERIMENT_KIND,
    VIEW_KEY,
    mark_model_training,
    runs_table_route,
    share_columns_view,
)
from featureatlas.tasks.tracking.stage import tracker_for

TAG = f"mlflow.sharedViewState.{VIEW_KEY}"


def test_experiment_kind_is_set_once_and_a_chosen_kind_is_kept(home):
    tracker = tracker_for(home)
    mark_model_training(tracker)
    client = tracker.client
    assert client.get_experiment(tracker.experiment_id).tags[EXPERIMENT_KIND[0]] == "custom_model_development"
    client.set_experiment_tag(tracker.experiment_id, EXPERIMENT_KIND[0], "genai_development")
    mark_model_training(tracker)
    assert client.get_experiment(tracker.experiment_id).tags[EXPERIMENT_KIND[0]] == "genai_development"


def test_shared_view_columns_cover_every_dictionary_once(home):
    tracker = tracker_for(home)
    client = tracker.client
    share_columns_view(tracker, 0)  # nothing to show: no view written
    assert TAG not in client.get_experiment(tracker.experiment_id).tags
    share_columns_view(tracker, 2)
    state = json.loads(client.get_experiment(tracker.experiment_id).tags[TAG])
    assert state["selectedColumns"] == [
        "metrics.`dict0.fvu`",
        "metrics.`dict0.l0`",
        "metrics.`dict0.ce_loss_score`",
        "tags.`dict0`",
        "metrics.`dict1.fvu`",
        "metrics.`dict1.l0`",
        "metrics.`dict1.ce_loss_score`",
        "tags.`dict1`",
    ]
    # a column someone added by hand and other view settings survive; a smaller run adds nothing twice
    state["selectedColumns"].insert(0, "params.`name`")
    state["orderByKey"] = "metrics.`dict0.fvu`"
    client.set_experiment_tag(tracker.experiment_id, TAG, json.dumps(state))
    share_columns_view(tracker, 1)
    again = json.loads(client.get_experiment(tracker.experiment_id).tags[TAG])
    assert again == state
    route = runs_table_route(tracker.experiment_id)
    assert route == (
        f"#/experiments/{tracker.experiment_id}/runs?workflowType=machine_learning&viewStateShareKey=dictionaries"
    )


def _finish_pipelines(home_dir: str, barrier, rounds: int) -> None:
    import os

    from featureatlas.schemas.artifacts import PipelineResult
    from featureatlas.schemas.settings import Settings
    from featureatlas.tasks.tracking.lineage import record_lineage

    os.environ["FEATUREATLAS_HOME"] = home_dir
    for i in range(rounds):  # a new experiment each round: its tags are new rows, inserted by all at once
        os.environ["FEATUREATLAS_EXPERIMENT"] = f"e{i}"
        tracker = tracker_for(Settings())
        run = tracker.start("pipeline")
        barrier.wait(timeout=60)
        record_lineage(tracker, PipelineResult(mlflow_run_id=run.run_id))


def test_pipelines_finishing_at_once_all_record_their_lineage(tmp_path):
    """Processes that end together all write the experiment's new tags (MLflow's store reads, then inserts:
    unguarded, one of them fails on the unique key)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(4)
    args = (str(tmp_path / "home"), barrier, 8)
    procs = [ctx.Process(target=_finish_pipelines, args=args) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * 4
