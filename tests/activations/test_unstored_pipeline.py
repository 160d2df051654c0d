"""A whole pipeline without stored activations (`cache: {store: false}`): the cache stage writes tokens and
contexts only, training streams forward passes, evaluation and labeling recompute what they read, and the
dictionary records what it saw."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from featureatlas.schemas.spec import parse_spec
from featureatlas.tasks.common.store import ActivationCache
from featureatlas.tasks.tracking.catalog import open_catalog
from tests.flows.test_pipeline import tiny_spec


@pytest.mark.slow
def test_a_pipeline_without_stored_activations_runs_end_to_end(tmp_path, home, prefect_harness):  # noqa: ARG001
    from featureatlas.flows.pipeline import pipeline_flow

    stored = parse_spec(tiny_spec(tmp_path))
    spec = parse_spec(tiny_spec(tmp_path, cache={"shard_tokens": 512, "batch_size": 8, "store": False}))
    result = pipeline_flow(spec)
    cache = Path(result.cache.path)
    assert not (cache / "acts").exists() and not ActivationCache(cache).stored
    d = result.dictionaries[0]
    seen = json.loads((Path(d.dictionary.path) / "seen.json").read_text())
    assert seen["tokens_trained"] > 0 and seen["statistics"]["rows"] > 0 and seen["forward_tokens"] > 0
    assert 0.0 <= d.evaluation.dead_fraction <= 1.0 and d.evaluation.l0 <= 4 + 1e-6
    assert (Path(d.labeling.path) / "atlas" / "index.html").is_file()
    edges = set(open_catalog(home.catalog).edges())
    assert {(result.cache.id, result.model.id), (d.dictionary.id, result.cache.id)} <= edges

    # the same tokens stored: another cache, the same dictionary weights up to float tolerance
    other = pipeline_flow(stored)
    assert other.cache.id != result.cache.id
    assert other.dictionaries[0].evaluation.fvu == pytest.approx(d.evaluation.fvu, rel=1e-4, abs=1e-6)
