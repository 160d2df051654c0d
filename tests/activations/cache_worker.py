"""A caching process for the kill-and-resume test: `python -m tests.activations.cache_worker ARGS_JSON`.

It caches a tiny Llama with a short sleep per forward pass, so the test can kill it between shards.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from schemas.spec import CacheSpec, CorpusSpec
from tasks.activations.cache import write_cache
from tasks.common.corpus import load_documents
from tasks.common.models import LoadedModel
from tests.helpers import build_tiny_llama, build_tiny_tokenizer


def run(args: dict, sleep_s: float = 0.0) -> None:
    model = build_tiny_llama()
    if sleep_s:
        model.register_forward_pre_hook(lambda *_: time.sleep(sleep_s))
    corpus = CorpusSpec(**args["corpus"])
    write_cache(
        LoadedModel(model, build_tiny_tokenizer(bos=True), torch.device("cpu")),
        load_documents(corpus),
        corpus,
        CacheSpec(**args["cache"]),
        args["hookpoints"],
        Path(args["out"]),
        header={"model_id": "m"},
    )


if __name__ == "__main__":
    run(json.loads(sys.argv[1]), sleep_s=0.15)
