"""A real (tiny) model, corpus and activation cache made through the stage functions, without Prefect.

Shared by the trainer's stage-level tests and by `train_worker`, the process the kill-and-resume test kills.
"""

from __future__ import annotations

import json
from pathlib import Path

from featureatlas.schemas.artifacts import ActivationCacheRef
from featureatlas.schemas.settings import Settings
from featureatlas.schemas.spec import CacheSpec, CorpusSpec, ModelSpec
from featureatlas.tasks.activations.task import cache_activations, prepare_corpus, register_model
from featureatlas.tasks.tracking.stage import StageContext
from tests.helpers import TINY_TEXT, save_tiny_llama

HOOKPOINT = "model.layers.1"


def build_cache(
    root: Path, settings: Settings, shard_tokens: int = 128
) -> tuple[StageContext, ActivationCacheRef]:
    """A context in `settings`' home and a cache of ~1500 tokens of a tiny Llama (d_in 32), several shards."""
    model_dir = root / "tiny-llama"
    if not model_dir.is_dir():
        save_tiny_llama(model_dir)
    corpus = root / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": " ".join(TINY_TEXT[i : i + 6])}) for i in range(24)))
    ctx = StageContext(settings=settings)
    model = register_model.fn(ctx, ModelSpec(path=str(model_dir)))
    spec = CorpusSpec(sources=[str(corpus)], context_length=32, max_tokens=2048, heldout_fraction=0.25)
    cache = cache_activations.fn(
        ctx,
        model,
        prepare_corpus.fn(ctx, spec),
        [HOOKPOINT],
        CacheSpec(shard_tokens=shard_tokens, batch_size=8),
    )
    return ctx, cache
