"""Can the shard writer keep up with a GPU's forward passes? One hookpoint's `ShardWriter` fed rows already in
memory, so nothing but the writer is timed.

    python benchmarks/bench_writer.py [--d-in 2048 4096] [--rows 262144] [--shard-tokens 65536]

Per width, bfloat16 rows (the dtype a bfloat16 model caches) go through two writers, alternated `--repeats`
times, the least time of each kept:
  inline   the sha256 computed in line with the file write, in turn (`ShardWriter(hash_beside=False)`)
  beside   the default: the sha256 on a thread of its own while the rows are written
Both sum the statistics on a thread of their own. Each run ends with `finish`, so every shard is written,
hashed, summed and fsynced. The goal is 10^5 rows/s per hookpoint or more: a GPU's forward passes cache at
that rate. With `--tmp` on a memory file system (/dev/shm) the disk is left out. The last line is one JSON
object: per width `inline_rows_per_s`, `beside_rows_per_s` and `speedup`, with `cores` and `load_avg`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_scale as scale  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-in", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--rows", type=int, default=1 << 18)
    ap.add_argument("--shard-tokens", type=int, default=1 << 16)
    ap.add_argument("--batch", type=int, default=8192, help="rows handed to the writer at a time")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tmp", default=None, help="folder for the shards (default: the system's)")
    args = ap.parse_args()
    scale._source_tree_package()
    from featureatlas.tasks.common import shards

    layouts = {"inline": False, "beside": True}
    result: dict = {"cores": len(os.sched_getaffinity(0)), "rows": args.rows, "tmp": args.tmp or "system"}
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        for d_in in args.d_in:
            rows = torch.randn(args.rows, d_in).to(torch.bfloat16)
            best = {}
            for i in range(args.repeats):
                for name, beside in layouts.items():
                    folder = Path(tmp) / f"{name}{i}"
                    writer = shards.ShardWriter(
                        folder, "resid_post.0", d_in, "bfloat16", args.shard_tokens, hash_beside=beside
                    )
                    start = time.perf_counter()
                    for batch in rows.split(args.batch):
                        writer.add(batch)
                    writer.finish()
                    seconds = time.perf_counter() - start
                    best[name] = min(seconds, best.get(name, seconds))
                    shutil.rmtree(folder)
            per_s = {name: args.rows / s for name, s in best.items()}
            result[str(d_in)] = {
                "inline_rows_per_s": round(per_s["inline"]),
                "beside_rows_per_s": round(per_s["beside"]),
                "speedup": round(per_s["beside"] / per_s["inline"], 3),
            }
            print(d_in, result[str(d_in)], file=sys.stderr)  # noqa: T201
    result["load_avg"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(result))  # noqa: T201


if __name__ == "__main__":
    main()
