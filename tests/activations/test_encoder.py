"""A BERT-style encoder from a local folder: loaded with AutoModel, cached at aliases like any causal LM."""

from __future__ import annotations

import json

import pytest
import torch

from featureatlas.schemas.spec import CacheSpec, CorpusSpec, ModelSpec, SpecError, parse_spec
from featureatlas.tasks.activations.cache import write_cache
from featureatlas.tasks.common.corpus import build_contexts, load_documents
from featureatlas.tasks.common.models import load_model
from featureatlas.tasks.common.store import ActivationCache
from tests.helpers import TINY_TEXT, build_tiny_bert, build_tiny_tokenizer


def test_encoder_loads_and_caches(tmp_path):
    folder = tmp_path / "bert"
    build_tiny_bert().save_pretrained(folder)
    build_tiny_tokenizer().save_pretrained(folder)
    loaded = load_model(str(folder), ModelSpec(path=str(folder), kind="encoder", device="cpu"))
    assert type(loaded.model).__name__ == "BertModel"
    docs_path = tmp_path / "docs.jsonl"
    docs_path.write_text("\n".join(json.dumps({"text": t}) for t in TINY_TEXT[:8]))
    corpus = CorpusSpec(sources=[str(docs_path)], context_length=16, max_tokens=300, min_context_tokens=4)
    docs = load_documents(corpus)
    write_cache(
        loaded, docs, corpus, CacheSpec(batch_size=4), ["resid_post.1", "attn_z.0"], tmp_path / "c", header={}
    )
    store = ActivationCache(tmp_path / "c")
    contexts = build_contexts(docs, loaded.tokenizer, corpus)
    with torch.no_grad():
        hs = loaded.model(
            input_ids=contexts.input_ids, attention_mask=contexts.attention_mask, output_hidden_states=True
        ).hidden_states
    torch.testing.assert_close(store.load("resid_post.1"), hs[2][contexts.attention_mask.bool()])
    assert store.manifest["hookpoints"]["attn_z.0"]["module"] == "encoder.layer.0.attention.output.dense"


def test_encoder_spec_refuses_ce_loss_evaluation():
    raw = {
        "model": {"path": "x", "kind": "encoder"},
        "hookpoints": ["resid_post.0"],
        "dictionaries": [{"method": "topk", "d_sae": 64, "k": 4}],
    }
    with pytest.raises(SpecError, match="enabled: false"):
        parse_spec(raw)
    assert parse_spec(raw | {"evaluate": {"enabled": False}}).model.kind == "encoder"
