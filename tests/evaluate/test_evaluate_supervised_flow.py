"""The evaluation stage with the supervised IOI figures and the atomic geometry switched on, through the real
flow (Prefect test server, SQLite catalog, MLflow store), down to `featureatlas compare`'s rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from featureatlas.schemas.spec import EvaluateSpec, parse_spec
from featureatlas.tasks.evaluate.compare import comparison_rows
from featureatlas.tasks.evaluate.templates import ioi_task
from featureatlas.tasks.tracking.catalog import open_catalog
from tests.evaluate.test_supervised import word_tokenizer
from tests.helpers import TINY_TEXT, build_tiny_llama


def test_supervised_prompts_must_be_enough():
    with pytest.raises(ValueError, match="too few"):
        EvaluateSpec(supervised_prompts=3)
    assert EvaluateSpec().supervised_prompts == 0  # off by default: it costs ~20 forward passes


def test_flow_reports_supervised_figures_and_atomic_geometry(tmp_path, home, prefect_harness):  # noqa: ARG001
    from featureatlas.flows.pipeline import pipeline_flow

    # A tiny Llama with a word-level tokenizer, so the IOI names are single tokens (unknown words -> [PAD]).
    model_dir = tmp_path / "tiny-llama"
    build_tiny_llama(seed=0, initializer_range=0.3).save_pretrained(model_dir)
    extra = " ".join(TINY_TEXT).replace(".", " . ").replace(";", " ; ")
    word_tokenizer(ioi_task(), extra=extra.split()).save_pretrained(model_dir)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": " ".join(TINY_TEXT[i : i + 6])}) for i in range(24)))
    spec = parse_spec(
        {
            "name": "tiny-ioi",
            "model": {"path": str(model_dir)},
            "corpus": {
                "sources": [str(corpus)],
                "context_length": 32,
                "max_tokens": 2048,
                "heldout_fraction": 0.25,
            },
            "hookpoints": ["model.layers.1"],
            "dictionaries": [{"method": "topk", "d_sae": 64, "k": 4, "batch_size": 256, "epochs": 2}],
            "evaluate": {
                "max_tokens": 512,
                "ce_contexts": 4,
                "ablation_latents": 0,
                "steering_latents": 0,
                "supervised_prompts": 16,
            },
            "label": {"enabled": False},
        }
    )
    result = pipeline_flow(spec)
    ev = result.dictionaries[0].evaluation
    sup, geo = ev.details.supervised, ev.details.atomic_geometry
    assert sup.task == "ioi" and sup.n_prompts == 16 and len(sup.control) == 6
    assert {m.attribute for m in sup.best_latents} == set(sup.attributes)
    assert geo.k == pytest.approx(ev.l0) and geo.bound == pytest.approx(1 / (2 * ev.l0 - 1))
    assert 0.0 <= geo.unique_fraction <= 1.0 and geo.n_directions <= 64
    # the d_in = 32 neuron directions against the dense L0 of the residual stream
    assert geo.neuron_l0 == pytest.approx(32.0)
    client = MlflowClient(home.mlflow_uri)
    run = next(
        r
        for r in client.search_runs(
            [client.get_experiment_by_name(home.experiment).experiment_id],
            filter_string="tags.`featureatlas.stage` = 'evaluation'",
        )
    )
    assert run.data.metrics["ioi_logit_diff_clean"] == pytest.approx(sup.logit_diff_clean)
    assert run.data.metrics["geometry_atomic_unique_fraction"] == pytest.approx(geo.unique_fraction)
    (row,) = comparison_rows(open_catalog(home.catalog))
    assert row.ioi_sufficiency == sup.dictionary_sufficiency
    assert Path(ev.path, "eval.json").is_file()
