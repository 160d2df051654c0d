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
