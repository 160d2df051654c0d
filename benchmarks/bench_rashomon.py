"""Rashomon-set interaction scores: planted truth at the stage's defaults, then the speed of the FIS paths.

Planted truth (`planted()`): two regression tables of 1000 rows and 5 standard-normal features, `y = x1 * x2 +
x3 + noise` (the interaction task) and `y = x1 + x2 + x3 + noise` (the additive task), noise sd 0.3, 30% held
out. Each is scored as the stage scores it at its defaults (an MLP reference, 30 permutations, 20 additive
null worlds, band z = 4) at epsilon = 0.05, 0.1 and 0.2 L*. Reported: whether the planted pair comes first
and interacts (`top_pair_correct`), whether every pair's FIS range nests as epsilon grows (`ranges_nested`,
3 rate pairs x 10 pairs x 2 tasks), the pairs flagged as interacting in the additive task (`spurious_pairs`,
goal 0) and in the interaction task besides the planted one, and the Monte-Carlo error: the spread of the
planted pair's reference FIS over 10 fresh sets of 30 permutations against the mean `fis_se` the runs report.

Speed (`bench()`): time per FIS cloud (one pair: the halo's 44 split/sign models plus the reference, every
permutation) for 10, 30 and 100 features, three ways on the same models and permutations in the same run:

- naive: a Python loop per model, set and permutation (`pair_fis_naive`), each call a 256-row forward pass;
- batched: every model, set and permutation stacked into one forward pass of the model (`pair_fis` on a
  plain callable), which only saves per-call overhead;
- structured: the `Layered` path (`pair_fis` on a `Layered` model): permuting columns S changes the first
  layer's pre-activations by a rank-|S| update, so each model/set/permutation costs n * h, not n * p * h,
  and the batch is one tensor expression.

Also the exploration (greedy scaling search), generic against structured, over the same few steps. Sizes
are shrunk for a shared 2-core CPU: 256 rows, 3 permutations, 4 pairs per size (2 for the naive loop), for
two fixed random references: an MLP (p -> 64 -> 1, tanh, MSE) and a linear model. One thread, so the figures
do not depend on the other core's load. Last line: one JSON object with `top_pair_correct`, `ranges_nested`,
`spurious_pairs` and the planted-truth details under `planted`; per size `features_<p>`, `seconds` and
`speedup_vs_naive` are the structured path's on the MLP, the linear model's figures nested under `linear`.
"""

from __future__ import annotations

import json
import os
import resource
import time

import numpy as np
import polars as pl
import torch

from featureatlas.schemas.interactions import InteractionsSpec
from featureatlas.tasks.interactions.data import fit_reference, split_frame
from featureatlas.tasks.interactions.fis import Layered, pair_fis, pair_fis_naive
from featureatlas.tasks.interactions.null import null_worlds
from featureatlas.tasks.interactions.rashomon import BUDGETS, explore, pair_models
from featureatlas.tasks.interactions.score import permutations, score_pairs

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
    halo = BUDGETS * 0.1
    explore_generic = timed(lambda: explore(f, X, y, "mse", 0.1, halo, max_steps=EXPLORE_STEPS))
    explore_layered = timed(lambda: explore(layered, X, y, "mse", 0.1, halo, max_steps=EXPLORE_STEPS))
    ex = explore(layered, X, y, "mse", 0.1, halo, max_steps=60)  # the halo's 44 boundary models
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


RATES = (0.05, 0.1, 0.2)


def planted_table(kind: str, n: int = 1000, p: int = 5, seed: int = 2):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, p))
    signal = x[:, 0] * x[:, 1] + x[:, 2] if kind == "interaction" else x[:, 0] + x[:, 1] + x[:, 2]
    frame = pl.DataFrame(
        {f"x{i + 1}": x[:, i] for i in range(p)} | {"y": signal + 0.3 * rng.standard_normal(n)}
    )
    return split_frame(frame, "y", kind, "regression", 0.3, seed)


def planted_task(kind: str) -> dict:
    """One task at the stage's defaults: null worlds once, then the set at every rate (verdict at 0.1)."""
    spec = InteractionsSpec(enabled=True, table=f"{kind}.csv", target="y")
    t = planted_table(kind)
    X, y = torch.as_tensor(t.X_test), torch.as_tensor(t.y_test)
    start = time.perf_counter()
    f = fit_reference(spec.reference, t, spec.seed)
    worlds = null_worlds(t, lambda w, s: fit_reference(spec.reference, w, s), spec.n_null, spec.seed)
    null_seconds = time.perf_counter() - start
    runs, seconds = {}, {}
    for rate in RATES:
        start = time.perf_counter()
        runs[rate] = score_pairs(
            f, X, y, t.features, t.loss, rate, spec.n_permutations, spec.seed, False,
            max_scale=spec.max_scale, null_worlds=worlds if rate == spec.rate else None, null_z=spec.null_z,
        )  # fmt: skip
        seconds[rate] = time.perf_counter() - start
    verdict = runs[spec.rate].table
    nested, checked = 0, 0
    for small, large in zip(RATES, RATES[1:]):
        joined = runs[small].table.join(runs[large].table, on=["feature_i", "feature_j"], suffix="_l")
        inside = (joined["fis_min_l"] <= joined["fis_min"] + 1e-12) & (
            joined["fis_max_l"] >= joined["fis_max"] - 1e-12
        )
        nested, checked = nested + int(inside.sum()), checked + joined.height
    flagged = [
        f"{r['feature_i']} x {r['feature_j']}"
        for r in verdict.filter(pl.col("interacts")).iter_rows(named=True)
    ]
    top = verdict.row(0, named=True)
    timing = ", ".join(f"eps {r} L*: {seconds[r]:.1f} s" for r in RATES)
    print(f"{kind}: L* {runs[spec.rate].ref_loss:.4f}; null worlds {null_seconds:.1f} s; scoring {timing}")
    print(f"    ranges nested from eps to the next: {nested} of {checked} pair comparisons")
    ranges = {
        q: {(r["feature_i"], r["feature_j"]): r["fis_range"] for r in runs[q].table.iter_rows(named=True)}
        for q in RATES
    }
    for r in verdict.head(4).iter_rows(named=True):
        pair = (r["feature_i"], r["feature_j"])
        print(
            f"    {pair[0]} x {pair[1]}: fis_ref {r['fis_ref']:+.4f} +- {r['fis_se']:.4f}, null band "
            f"[{r['null_low']:+.4f}, {r['null_high']:+.4f}], interacts {r['interacts']}; range at eps "
            + ", ".join(f"{q}: {ranges[q][pair]:.4f}" for q in RATES)
        )
    return {
        "top_pair": [top["feature_i"], top["feature_j"]],
        "top_interacts": bool(top["interacts"]),
        "flagged": flagged,
        "nested": nested,
        "checked": checked,
        "fis_se_top": round(top["fis_se"], 5),
        "null_seconds": round(null_seconds, 2),
        "score_seconds": {str(r): round(v, 2) for r, v in seconds.items()},
    }


def se_calibration(repeats: int = 10) -> dict:
    """The planted pair's reference FIS over `repeats` fresh sets of 30 permutations: its spread against the
    standard error each set reports."""
    t = planted_table("interaction")
    X, y = torch.as_tensor(t.X_test), torch.as_tensor(t.y_test)
    f = fit_reference("mlp", t, 0)
    ones = torch.ones(1, X.shape[1], dtype=X.dtype)
    with torch.no_grad():
        out = [
            pair_fis(f, X, y, ones, (0, 1), permutations(len(y), 30, 100 + s), "mse") for s in range(repeats)
        ]
    fis = torch.stack([o["fis"][0] for o in out])
    se = float(torch.stack([o["fis_se"][0] for o in out]).mean())
    return {
        "fis_mean": round(float(fis.mean()), 4),
        "fis_sd_over_seeds": round(float(fis.std()), 4),
        "mean_fis_se": round(se, 4),
    }


def main() -> None:
    torch.set_num_threads(1)
    load = os.getloadavg()[0]
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tasks = {kind: planted_task(kind) for kind in ("interaction", "additive")}
    calibration = se_calibration()
    print(f"planted pair FIS over 10 permutation seeds: {calibration}")
    rss_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    out = {
        "top_pair_correct": tasks["interaction"]["top_pair"] == ["x1", "x2"]
        and tasks["interaction"]["top_interacts"],
        "ranges_nested": all(t["nested"] == t["checked"] for t in tasks.values()),
        "spurious_pairs": len(tasks["additive"]["flagged"]),
        "planted": tasks
        | {"se_calibration": calibration, "peak_rss_growth_mb": round(rss_mb, 1), "load_1min": load},
    }
    for p in (10, 30, 100):
        out[f"features_{p}"] = bench(p, mlp) | {"linear": bench(p, linear)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
