"""Time per FIS cloud (one pair: 44 split/sign models plus the reference, every permutation) for 10, 30
and 100 features, three ways on the same models and permutations in the same run:

- naive: a Python loop per model, set and permutation (`pair_fis_naive`), each call a 256-row forward pass;
- batched: every model, set and permutation stacked into one forward pass of the model (`pair_fis` on a
  plain callable), which only saves per-call overhead;
- structured: the `Layered` path (`pair_fis` on a `Layered` model): permuting columns S changes the first
  layer's pre-activations by a rank-|S| update, so each model/set/permutation costs n * h, not n * p * h,
  and the batch is one tensor expression.

Also the exploration (greedy scaling search), generic against structured, over the same few steps. Sizes
are shrunk for a shared 2-core CPU: 256 rows, 3 permutations, 4 pairs per size (2 for the naive loop), for
two fixed random references: an MLP (p -> 64 -> 1, tanh, MSE) and a linear model. One thread, so the figures
do not depend on the other core's load. Last line: one JSON object; `seconds` and `speedup_vs_naive` are the
structured path's on the MLP, the linear model's figures nested under `linear`.
"""

from __future__ import annotations

import json
import time

import torch

from featureatlas.tasks.interactions.fis import Layered, pair_fis, pair_fis_naive
from featureatlas.tasks.interactions.rashomon import explore, pair_models

N_ROWS, N_PERMS, PAIRS, NAIVE_PAIRS, EXPLORE_STEPS = 256, 3, 4, 2, 4


def mlp(p: int):
    torch.manual_seed(p)
    net = torch.nn.Sequential(torch.nn.Linear(p, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    net.requires_grad_(False)
    return (
        lambda Z: net(Z).squeeze(-1),
        Layered(net[0].weight, net[0].bias, lambda H: net[2](torch.tanh(H)).squeeze(-1)),
    )


def linear(p: int):
    torch.manual_seed(p)
    w, b = torch.randn(1, p) / p**0.5, torch.zeros(1)
    return lambda Z: (Z @ w.T + b).squeeze(-1), Layered(w, b, lambda H: H.squeeze(-1))


def timed(fn) -> float:
    t = time.perf_counter()
    with torch.no_grad():
        fn()
    return time.perf_counter() - t


def bench(p: int, learner) -> dict:
    f, layered = learner(p)
    X = torch.randn(N_ROWS, p)
    y = f(X) + 0.1 * torch.randn(N_ROWS)
    explore_generic = timed(lambda: explore(f, X, y, "mse", 0.1, max_steps=EXPLORE_STEPS))
    explore_layered = timed(lambda: explore(layered, X, y, "mse", 0.1, max_steps=EXPLORE_STEPS))
    ex = explore(layered, X, y, "mse", 0.1, max_steps=60)
    perms = torch.stack([torch.randperm(N_ROWS) for _ in range(N_PERMS)])
    pairs = [(k, (k + 1 + p // 2) % p) for k in range(PAIRS)]
    models = {pr: torch.cat([pair_models(ex, pr)[0], torch.ones(1, p)]) for pr in pairs}
    # same numbers from all three paths, so the timings compare like with like
    pr = pairs[0]
    ref = pair_fis_naive(f, X, y, models[pr], pr, perms, "mse")
    assert torch.allclose(pair_fis(layered, X, y, models[pr], pr, perms, "mse")["fis"], ref, atol=1e-4)
    assert torch.allclose(pair_fis(f, X, y, models[pr], pr, perms, "mse")["fis"], ref, atol=1e-4)

    def mean_time(fn, some) -> float:
        return sum(timed(lambda q=q: fn(q)) for q in some) / len(some)

    structured = mean_time(lambda q: pair_fis(layered, X, y, models[q], q, perms, "mse"), pairs)
    batched = mean_time(lambda q: pair_fis(f, X, y, models[q], q, perms, "mse"), pairs)
    naive = mean_time(lambda q: pair_fis_naive(f, X, y, models[q], q, perms, "mse"), pairs[:NAIVE_PAIRS])
    print(
        f"{learner.__name__:>6} {p:>3} features, per cloud: naive {naive * 1e3:.1f} ms, batched "
        f"{batched * 1e3:.1f} ms ({naive / batched:.1f}x), structured {structured * 1e3:.1f} ms "
        f"({naive / structured:.1f}x); exploration ({EXPLORE_STEPS} steps) generic {explore_generic:.2f} s, "
        f"structured {explore_layered:.2f} s ({explore_generic / explore_layered:.1f}x)"
    )
    return {
        "seconds": round(structured, 4),
        "speedup_vs_naive": round(naive / structured, 2),
        "naive_seconds": round(naive, 4),
        "batched_seconds": round(batched, 4),
        "batched_speedup_vs_naive": round(naive / batched, 2),
        "exploration_speedup": round(explore_generic / explore_layered, 2),
    }


def main() -> None:
    torch.set_num_threads(1)
    out = {}
    for p in (10, 30, 100):
        out[f"features_{p}"] = bench(p, mlp) | {"linear": bench(p, linear)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
