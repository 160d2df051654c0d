"""A caching process for the kill-and-resume test: `python -m tests.activations.cache_worker ARGS_JSON`.

It caches a tiny Llama with a short sleep per forward pass, so the test can kill it between shards. With a
"part" in ARGS_JSON it prepares the folder and writes that one part of the cache only.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from featureatlas.schemas.spec import CacheSpec, CorpusSpec
from featureatlas.tasks.activations.cache import plan_cache, prepare_cache, write_cache, write_part
from featureatlas.tasks.common.corpus import load_documents
from featureatlas.tasks.common.models import LoadedModel
from tests.helpers import build_tiny_llama, build_tiny_tokenizer


def run(args: dict, sleep_s: float = 0.0) -> None:
    model = build_tiny_llama()
    if sleep_s:
        model.register_forward_pre_hook(lambda *_: time.sleep(sleep_s))
    corpus, cache, out = CorpusSpec(**args["corpus"]), CacheSpec(**args["cache"]), Path(args["out"])
    loaded = LoadedModel(model, build_tiny_tokenizer(bos=True), torch.device("cpu"))
    docs = load_documents(corpus)
    if "part" in args:
        plan = plan_cache(loaded, docs, corpus, cache, args["hookpoints"], header={"model_id": "m"})
        prepare_cache(plan, out)
        write_part(loaded, plan, cache, out, args["part"])
        return
    write_cache(loaded, docs, corpus, cache, args["hookpoints"], out, header={"model_id": "m"})


if __name__ == "__main__":
    run(json.loads(sys.argv[1]), sleep_s=0.15)
