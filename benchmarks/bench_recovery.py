"""Ground-truth recovery on the bias-adaptation toy of "Taming Polysemanticity" (Chen et al. 2025).

128 random unit-norm features in 42 dimensions; each sample is a non-negative combination of 3 of them (half
the samples) or 20 of them (the other half), coefficients uniform in [0.5, 1.5). Recovery rate = the share of
true features whose best-matching learned direction has cosine > 0.8 (frr_08) and > 0.9 (frr_09).

Run: `python benchmarks/bench_recovery.py [--quick]`; the last line is one JSON object keyed by setting.
Settings whose method is not registered (ReLU-L1, JumpReLU until they land) are skipped.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import Tensor

from schemas.methods import BAConfig, GBAConfig, TopKConfig
from tasks.dictionary import METHODS, train_dictionary

N_FEATURES, D_IN = 128, 42
K_SPARSE, K_DENSE = 3, 20
# Each feature's firing frequency: half the samples draw 3 of 128, half draw 20 of 128.
TRUE_FREQ = (K_SPARSE + K_DENSE) / 2 / N_FEATURES


def make_toy(n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """(features [128, 42] unit-norm, acts [n, 42])."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(N_FEATURES, D_IN, generator=g)
    features /= features.norm(dim=-1, keepdim=True)
    ranks = torch.rand(n, N_FEATURES, generator=g).argsort(-1).argsort(-1)
    n_active = torch.where(torch.arange(n) < n // 2, K_SPARSE, K_DENSE).unsqueeze(-1)
    active = ranks < n_active
    coefs = (torch.rand(n, N_FEATURES, generator=g) + 0.5) * active
    acts = coefs @ features
    return features, acts[torch.randperm(n, generator=g)]


def recovery(features: Tensor, learned: Tensor) -> dict[str, float]:
    learned = learned / learned.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    best = (features @ learned.T).max(dim=1).values
    return {
        "frr_08": round((best > 0.8).float().mean().item(), 4),
        "frr_09": round((best > 0.9).float().mean().item(), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps, for a smoke test")
    parser.add_argument("--d-sae", type=int, default=512)
    args = parser.parse_args()
    torch.set_num_threads(1)
    steps = 600 if args.quick else 2000
    features, acts = make_toy(50_000)
    common = dict(d_sae=args.d_sae, batch_size=256, steps=steps, seed=0, device="cpu", log_every=steps)
    settings = {
        "ba": BAConfig(target_freq=TRUE_FREQ, lr=1e-3, **common),
        "gba": GBAConfig(lr=1e-3, **common),
        # A range around the true frequency (0.09) instead of the default 0.5 .. 1e-3.
        "gba_tuned": GBAConfig(lr=1e-3, freq_high=0.3, freq_low=0.03, **common),
        "topk_20": TopKConfig(k=20, lr=1e-3, **common),
        "topk_30": TopKConfig(k=30, lr=1e-3, **common),
    }
    results: dict[str, dict[str, float]] = {}
    for name, cfg in settings.items():
        if cfg.method not in METHODS:
            continue
        t0 = time.perf_counter()
        result = train_dictionary(cfg, acts)
        results[name] = recovery(features, result.dictionary.decoder_directions())
        results[name]["fvu"] = round(result.final_metrics["fvu"], 4)
        print(f"{name:10s} {results[name]}  ({time.perf_counter() - t0:.1f} s)")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
