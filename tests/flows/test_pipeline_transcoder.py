"""A transcoder spec runs through the real flow on a tiny Llama: its input and target hookpoints are cached,
it trains on both, is evaluated against the target with the target spliced, and is labeled."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from featureatlas.schemas.spec import parse_spec
from featureatlas.tasks.dictionary import load_dictionary
from tests.flows.test_pipeline import pipeline, tiny_spec  # noqa: F401  (fixture)

# Slow only by this suite's standards (a flow run of ~40 s); kept out of the fast default run.
pytestmark = pytest.mark.slow

SOURCE, TARGET = "model.layers.1.post_attention_layernorm", "mlp_out.1"


def test_transcoder_spec_trains_evaluates_and_labels(tmp_path, pipeline):  # noqa: F811
    entry = {"method": "topk", "hookpoint": SOURCE, "target_hookpoint": TARGET, "d_sae": 64, "k": 4}
    spec = tiny_spec(
        tmp_path,
        hookpoints=[SOURCE, TARGET],
        dictionaries=[entry | {"batch_size": 256, "epochs": 2}],
    )
    result = pipeline(parse_spec(spec))
    (d,) = result.dictionaries
    assert (d.dictionary.hookpoint, d.dictionary.config.target_hookpoint) == (SOURCE, TARGET)
    cfg = json.loads((Path(d.dictionary.path) / "cfg.json").read_text())
    assert (cfg["hookpoint"], cfg["target_hookpoint"]) == (SOURCE, TARGET)
    sae = load_dictionary(Path(d.dictionary.path))
    assert sae.is_transcoder and sae.target_scale != sae.input_scale

    report = json.loads((Path(d.evaluation.path) / "eval.json").read_text())
    assert report["target_hookpoint"] == TARGET
    assert math.isfinite(d.evaluation.fvu) and math.isfinite(d.evaluation.ce_loss_spliced)
    # The spliced run replaced the MLP's output (by the transcoder's, from the input site): the loss moved.
    assert d.evaluation.ce_loss_spliced != d.evaluation.ce_loss_clean
    # Ablation and steering ran too: codes read at the input site, removed and steered at the target.
    assert d.evaluation.details.ablations and d.evaluation.details.steering
    assert Path(d.labeling.path).is_dir()
