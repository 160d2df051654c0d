"""A sweep from one pass over a streamed cache against the same dictionaries trained one after another.

Writes a synthetic activation cache (planted sparse features, `--rows` x `--d-in`, float32 shards) in a
temporary folder, then trains `--n-dicts` TopK SAEs (k = 8, 16, 32, ...) on it for one epoch: first each alone
(one pass over the cache each), then all together (one pass). Reports wall and CPU time, shard reads and the
ratios separate / sweep, measured in the same process, and checks that both ways give the same weights.

    python benchmarks/bench_sweep.py                       # 131072 rows of width 256, 4 dictionaries
    python benchmarks/bench_sweep.py --rows 32768          # smaller

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from featureatlas.schemas.methods import TopKConfig  # noqa: E402
from featureatlas.tasks.common.shards import ShardWriter, atomic_write_text  # noqa: E402
from featureatlas.tasks.common.store import ActivationCache  # noqa: E402
from featureatlas.tasks.dictionary.data import CacheSource  # noqa: E402
from featureatlas.tasks.dictionary.train import train_dictionaries, train_dictionary  # noqa: E402

HOOKPOINT = "resid"


def write_cache(folder: Path, rows: int, d_in: int, shard_tokens: int) -> None:
    """A cache folder ActivationCache reads: planted sparse codes times unit directions, in shards."""
    g = torch.Generator().manual_seed(0)
    directions = torch.randn(4 * d_in, d_in, generator=g)
    directions /= directions.norm(dim=-1, keepdim=True)
    writer = ShardWriter(folder, HOOKPOINT, d_in, "float32", shard_tokens)
    for start in range(0, rows, shard_tokens):
        n = min(shard_tokens, rows - start)
        active = torch.randint(0, directions.shape[0], (n, 8), generator=g)
        codes = torch.zeros(n, directions.shape[0]).scatter(-1, active, torch.rand(n, 8, generator=g) + 0.5)
        writer.add(codes @ directions)
    info = writer.finish()
    manifest = {"shard_tokens": shard_tokens, "hookpoints": {HOOKPOINT: info}, "exclude_first_token": False}
    atomic_write_text(json.dumps(manifest), folder / "manifest.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=131_072)
    parser.add_argument("--d-in", type=int, default=256)
    parser.add_argument("--d-sae", type=int, default=1024)
    parser.add_argument("--n-dicts", type=int, default=4)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--shard-tokens", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfgs = [
        TopKConfig(d_sae=args.d_sae, k=8 * 2**i, batch_size=args.batch, epochs=1, device="cpu", log_every=50)
        for i in range(args.n_dicts)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "cache"
        write_cache(folder, args.rows, args.d_in, args.shard_tokens)
        store = ActivationCache(folder)
        reads: list[int] = []
        real = ActivationCache.read_shard
        ActivationCache.read_shard = lambda self, hp, i: reads.append(i) or real(self, hp, i)
        rows = torch.arange(args.rows)
        # warm-up: the first steps of a process pay one-off costs (allocator, kernels) that would bias the
        # first of the two timings
        train_dictionary(cfgs[0].model_copy(update={"steps": 5}), CacheSource(store, HOOKPOINT, rows))
        reads.clear()

        # CPU time besides wall time: on a machine shared with other jobs, wall time mostly measures them
        t0, c0 = time.perf_counter(), time.process_time()
        alone = [train_dictionary(cfg, CacheSource(store, HOOKPOINT, rows)) for cfg in cfgs]
        separate_s, separate_cpu = time.perf_counter() - t0, time.process_time() - c0
        separate_reads = len(reads)
        reads.clear()
        t0, c0 = time.perf_counter(), time.process_time()
        together = train_dictionaries(cfgs, CacheSource(store, HOOKPOINT, rows))
        sweep_s, sweep_cpu = time.perf_counter() - t0, time.process_time() - c0
        sweep_reads = len(reads)
    same = all(
        torch.equal(a.dictionary.W_enc, b.dictionary.W_enc)
        and torch.equal(a.dictionary.W_dec, b.dictionary.W_dec)
        for a, b in zip(alone, together)
    )
    size = f"d_in {args.d_in}, d_sae {args.d_sae}, batch {args.batch}"
    print(f"{args.n_dicts} TopK SAEs ({size}), {args.rows} rows:")
    print(f"  one after another: {separate_s:7.2f} s wall, {separate_cpu:7.2f} s CPU, {separate_reads} reads")
    print(f"  one sweep:         {sweep_s:7.2f} s wall, {sweep_cpu:7.2f} s CPU, {sweep_reads} reads")
    print(f"  ratio separate / sweep: {separate_s / sweep_s:.2f} wall, {separate_cpu / sweep_cpu:.2f} CPU")
    print(f"  identical weights: {same}")
    print(
        json.dumps(
            {
                "sweep": {
                    "n_dicts": args.n_dicts,
                    "separate_s": round(separate_s, 3),
                    "sweep_s": round(sweep_s, 3),
                    "speedup": round(separate_s / sweep_s, 3),
                    "separate_cpu_s": round(separate_cpu, 3),
                    "sweep_cpu_s": round(sweep_cpu, 3),
                    "cpu_speedup": round(separate_cpu / sweep_cpu, 3),
                    "separate_reads": separate_reads,
                    "sweep_reads": sweep_reads,
                    "identical": same,
                }
            }
        )
    )


if __name__ == "__main__":
    main()
