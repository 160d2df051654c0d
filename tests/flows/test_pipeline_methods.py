"""Every issue-4a dictionary method runs through the real flow from a pipeline spec: trained, saved,
registered, evaluated and labeled through the `Dictionary` interface alone. One sweep, one flow run."""

from __future__ import annotations

from pathlib import Path

import pytest

from featureatlas.schemas.spec import parse_spec
from featureatlas.tasks.dictionary import load_dictionary
from tests.flows.test_pipeline import pipeline, tiny_spec  # noqa: F401  (fixture)

# Slow only by this suite's standards (a ~40 s flow run); kept out of the fast default run.
pytestmark = pytest.mark.slow

SWEEP = [
    {"method": "relu", "l1_coef": 1.0},
    {"method": "relu", "scaled_l1": True, "l1_warmup_steps": 4},
    {"method": "batchtopk", "k": 4},
    {"method": "matryoshka", "k": 4},
    {"method": "jumprelu"},
    {"method": "gated", "l1_coef": 1.0},
    {"method": "threshold", "tau": 0.5},
    {"method": "mp", "k": 4},
]


def test_every_variant_trains_evaluates_and_labels_from_a_spec(tmp_path, pipeline):  # noqa: F811
    dictionaries = [entry | {"d_sae": 64, "batch_size": 256, "epochs": 2} for entry in SWEEP]
    result = pipeline(parse_spec(tiny_spec(tmp_path, dictionaries=dictionaries)))
    assert [d.dictionary.config.method for d in result.dictionaries] == [e["method"] for e in SWEEP]
    for d in result.dictionaries:
        sae = load_dictionary(Path(d.dictionary.path))
        assert sae.method == d.dictionary.config.method
        assert 0.0 <= d.evaluation.dead_fraction <= 1.0
        assert Path(d.labeling.path).is_dir()
