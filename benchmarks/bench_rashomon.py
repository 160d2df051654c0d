"""Time per FIS cloud (one pair: 44 split/sign models plus the reference, every permutation) for 10, 30
and 100 features, batched (`pair_fis`) against a Python loop per model, set and permutation
(`pair_fis_naive`), both in the same run on the same models and permutations.

Sizes are shrunk to finish in a few minutes on a shared 2-core CPU: 256 rows, 3 permutations, a fixed random
MLP (p -> 64 -> 1, MSE), clouds of 4 pairs per size for the batched path and 2 for the naive loop. One thread,
so that the figures do not depend on what else runs on the machine's other core. Last line: one JSON object.
"""

from __future__ import annotations

import json
import time

import torch

from tasks.interactions.fis import pair_fis, pair_fis_naive
from tasks.interactions.rashomon import explore, pair_models

N_ROWS, N_PERMS, BATCHED_PAIRS, NAIVE_PAIRS = 256, 3, 4, 2


def reference(p: int) -> torch.nn.Module:
    torch.manual_seed(p)
    net = torch.nn.Sequential(torch.nn.Linear(p, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    return net.requires_grad_(False)


def bench(p: int) -> dict:
    net = reference(p)

    def f(Z: torch.Tensor) -> torch.Tensor:
        return net(Z).squeeze(-1)

    X = torch.randn(N_ROWS, p)
    y = f(X) + 0.1 * torch.randn(N_ROWS)
    t0 = time.perf_counter()
    ex = explore(f, X, y, "mse", 0.1, max_steps=60)
    explore_s = time.perf_counter() - t0
    perms = torch.stack([torch.randperm(N_ROWS) for _ in range(N_PERMS)])
    pairs = [(k, (k + 1 + p // 2) % p) for k in range(BATCHED_PAIRS)]

    def cloud(pair: tuple[int, int], fn) -> float:
        M = torch.cat([pair_models(ex, pair)[0], torch.ones(1, p)])
        t = time.perf_counter()
        with torch.no_grad():
            fn(f, X, y, M, pair, perms, "mse")
        return time.perf_counter() - t

    batched = sum(cloud(pr, lambda *a: pair_fis(*a)["fis"]) for pr in pairs) / len(pairs)
    naive = sum(cloud(pr, pair_fis_naive) for pr in pairs[:NAIVE_PAIRS]) / NAIVE_PAIRS
    print(
        f"{p:>3} features: exploration {explore_s:.2f} s ({ex.steps} steps), per cloud batched "
        f"{batched * 1e3:.1f} ms, naive {naive * 1e3:.1f} ms, speedup {naive / batched:.1f}x"
    )
    return {
        "seconds": round(batched, 4),
        "speedup_vs_naive": round(naive / batched, 2),
        "naive_seconds": round(naive, 4),
        "exploration_seconds": round(explore_s, 3),
    }


def main() -> None:
    torch.set_num_threads(1)
    out = {f"features_{p}": bench(p) for p in (10, 30, 100)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
