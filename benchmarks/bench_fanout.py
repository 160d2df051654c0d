"""How a sweep's training work scales when fanned out: in turn, on threads, on local Dask worker processes.

The same N dictionary trainings (`tasks.dictionary.train.train_dictionary` on one synthetic activation
matrix) run one after another (the baseline, measured in this run), on a thread pool of W workers and on a
`distributed.LocalCluster` of W single-threaded worker processes on 127.0.0.1: the executors the pipeline's
`threads` and `dask` task runners use, without the Prefect bookkeeping around them. Torch is limited to
`--torch-threads` per job so the jobs, not torch's own threads, share the cores. Prints the wall times, the
speed-ups over the baseline, and as its last line one JSON object.

    python benchmarks/bench_fanout.py --jobs 4 --workers 2
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor

import torch


def _acts(n: int, d_in: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, d_in, generator=g)


def _train(job: int, n: int, d_in: int, d_sae: int, steps: int, torch_threads: int) -> float:
    """One sweep entry (k varies with the job); returns the last FVU so the work cannot be skipped."""
    torch.set_num_threads(torch_threads)
    from featureatlas.schemas.methods import TopKConfig
    from featureatlas.tasks.dictionary.train import train_dictionary

    cfg = TopKConfig(d_sae=d_sae, k=4 + job, batch_size=512, steps=steps, device="cpu", log_every=steps)
    return train_dictionary(cfg, _acts(n, d_in)).final_metrics["fvu"]


def _warm(n: int, d_in: int, d_sae: int, steps: int, torch_threads: int) -> None:
    _train(0, n, d_in, d_sae, min(steps, 2), torch_threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=4, help="Dictionaries in the sweep.")
    parser.add_argument("--workers", type=int, default=2, help="Threads / Dask worker processes.")
    parser.add_argument("--n", type=int, default=8192, help="Rows of activations.")
    parser.add_argument("--d-in", type=int, default=64)
    parser.add_argument("--d-sae", type=int, default=512)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--torch-threads", type=int, default=1)
    args = parser.parse_args()
    work = [(j, args.n, args.d_in, args.d_sae, args.steps, args.torch_threads) for j in range(args.jobs)]

    _warm(*work[0][1:])  # imports and first-call set-up stay out of the baseline too
    t0 = time.perf_counter()
    sequential = [_train(*w) for w in work]
    t_seq = time.perf_counter() - t0

    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.workers) as pool:
        threads = list(pool.map(lambda w: _train(*w), work))
    t_threads = time.perf_counter() - t0

    from distributed import Client, LocalCluster

    from featureatlas.tasks.tracking.fanout import dask_worker_config

    with (
        dask_worker_config(),
        LocalCluster(
            n_workers=args.workers, threads_per_worker=1, host="127.0.0.1", dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        client.run(_warm, *work[0][1:])  # every worker imports torch and featureatlas outside the timing
        t0 = time.perf_counter()
        dask = client.gather([client.submit(_train, *w, pure=False) for w in work])
        t_dask = time.perf_counter() - t0

    assert threads == sequential and dask == sequential, "fanned-out training changed the results"
    print(f"{args.jobs} trainings, {args.workers} workers, torch threads per job {args.torch_threads}")
    print(f"in turn   {t_seq:7.2f} s   1.00x")
    print(f"threads   {t_threads:7.2f} s   {t_seq / t_threads:.2f}x")
    print(f"dask      {t_dask:7.2f} s   {t_seq / t_dask:.2f}x")
    summary = {
        "jobs": args.jobs,
        "workers": args.workers,
        "sequential_s": round(t_seq, 3),
        "threads_speedup": round(t_seq / t_threads, 3),
        "dask_speedup": round(t_seq / t_dask, 3),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
