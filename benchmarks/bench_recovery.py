"""Ground-truth recovery: how many planted features each method finds.

1. The bias-adaptation toy of "Taming Polysemanticity" (Chen et al. 2025): 128 random unit-norm features in 42
   dimensions; each sample is a non-negative combination of 3 of them (half the samples) or 20 of them (the
   other half), coefficients uniform in [0.5, 1.5) (`synthetic.bias_adaptation_toy`). BA at the true
   frequency (seeds 0-2; at every default, lr included; with a fast bias schedule), GBA (default, seeds 0-1;
   the former wider default range; a range around the true rate), TopK (k = 20, 30, and 3, 8 below the dense
   half's 20), ReLU-L1 and JumpReLU, at their defaults unless named; `frr_08_at_init` is the recovery before
   any step (it must be ~0: the toy is not the init).
   For BA/GBA also the median firing rate of the latents and their median bias.
2. The hierarchical toy (`tasks.dictionary.synthetic.hierarchical_toy`): mutually exclusive parents, each with
   mutually exclusive children leaning towards it, plus independent singletons. MP-SAE against BatchTopK at
   the same k, recovery reported per kind of feature.
3. Semi-NMF on planted `A = F* G*^T + noise` (5-of-100-sparse signed F*, 30%-dense G* >= 0) over several
   draws: the share of draws whose every column is matched at cosine > 0.99, without and with init passes.

Recovery rate = the share of true features whose best-matching learned direction has cosine > 0.8 (frr_08)
and > 0.9 (frr_09). FVU and L0 are measured on held-out samples of the same toy (the last tenth, not trained
on) through the inference path (`reconstruction_metrics`: eval mode, BatchTopK's threshold), never on the
last training batch. Run: `python benchmarks/bench_recovery.py [--quick]`; the last line is one JSON object
keyed by method and setting.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from featureatlas.schemas.methods import (
    BAConfig,
    BatchTopKConfig,
    GBAConfig,
    JumpReLUConfig,
    MPConfig,
    ReLUConfig,
    SemiNMFConfig,
    TopKConfig,
)
from featureatlas.tasks.dictionary import train_dictionary
from featureatlas.tasks.dictionary.gba import GBASAE
from featureatlas.tasks.dictionary.synthetic import (
    bias_adaptation_toy,
    hierarchical_toy,
    planted_snmf,
    recovery,
    recovery_at_init,
)
from featureatlas.tasks.evaluate.metrics import reconstruction_metrics

# BA and GBA run at every default: the paper's bias schedule (an update every 50 steps, gamma_minus 0.01) and
# their own lr 3e-2 decaying over the last 30%. The lr is what decides (seed 0): at the other methods' 4e-4
# (`ba_lr_4e-4`)
# or 1e-3 the biases still settle (median -0.23 against -0.24 at 3e-2) but the rows of W have not turned onto
# the features (BA 0.047 at cosine 0.8 at lr 1e-3; 0.430 at 3e-3, 0.797 at 1e-2, 0.977 at 3e-2, 0.953 at
# 5e-2). A faster schedule hurts (`ba_fast_schedule`): the rule only lowers a live latent's bias, so biases
# pushed down while W is still unaligned stay too low once it aligns (median firing 6.0% against the 9%).
OTHER_LR = dict(lr=4e-4, decay_fraction=0.0)  # the TrainingConfig defaults


def held_out_figures(dictionary, held_out: torch.Tensor) -> dict[str, float]:
    """FVU and L0 of `dictionary` on rows it was not trained on, through encode/decode in eval mode."""
    m = reconstruction_metrics(dictionary.eval(), held_out)
    return {"fvu": round(m.fvu, 4), "l0": round(m.l0, 2)}


def ba_toy(steps: int, d_sae: int) -> dict[str, dict[str, float]]:
    toy = bias_adaptation_toy(50_000)
    train, held_out = toy.acts[:45_000], toy.acts[45_000:]
    common = dict(d_sae=d_sae, batch_size=256, steps=steps, seed=0, device="cpu", log_every=steps)
    ba = dict(target_freq=toy.true_freq, **common)
    settings = {
        "ba": BAConfig(**ba),
        "ba_seed1": BAConfig(**(ba | {"seed": 1})),
        "ba_seed2": BAConfig(**(ba | {"seed": 2})),
        "ba_lr_4e-4": BAConfig(**OTHER_LR, **ba),
        "ba_fast_schedule": BAConfig(update_every=5, **ba),
        # The default range follows d_in: 0.8 / sqrt(42) = 0.123 down to half of it.
        "gba": GBAConfig(**common),
        "gba_seed1": GBAConfig(**(common | {"seed": 1})),
        # The former rule, 1 / sqrt(42) = 0.154 down to a fifth, and a wide range around the true rate (0.09).
        "gba_wide": GBAConfig(freq_high=0.154, freq_low=0.0309, **common),
        "gba_tuned": GBAConfig(freq_high=0.3, freq_low=0.03, **common),
        "topk_20": TopKConfig(k=20, lr=3e-3, **common),
        "topk_30": TopKConfig(k=30, lr=3e-3, **common),
        # k below the dense half's 20: a 20-feature sample is then explained by its largest features.
        "topk_3": TopKConfig(k=3, lr=3e-3, **common),
        "topk_8": TopKConfig(k=8, lr=3e-3, **common),
        "relu": ReLUConfig(lr=1e-3, **common),
        "jumprelu": JumpReLUConfig(**common),  # its default lr is 1e-3
    }
    results: dict[str, dict[str, float]] = {}
    for name, cfg in settings.items():
        t0 = time.perf_counter()
        before = recovery_at_init(cfg, train, toy.features)["frr_08"]
        dictionary = train_dictionary(cfg, train).dictionary
        results[name] = recovery(toy.features, dictionary.decoder_directions())
        results[name] |= held_out_figures(dictionary, held_out)
        if isinstance(dictionary, GBASAE):
            with torch.no_grad():
                freq = (dictionary.encode(held_out) > 0).float().mean(0)
            results[name]["median_firing"] = round(freq.median().item(), 4)
            results[name]["median_bias"] = round(dictionary.b.median().item(), 4)
        results[name]["frr_08_at_init"] = before
        print(f"{name:20s} {results[name]}  ({time.perf_counter() - t0:.1f} s)", flush=True)
    return results


def hierarchy(steps: int) -> dict[str, dict[str, float]]:
    toy = hierarchical_toy(8000)
    train, held_out = toy.acts[:7200], toy.acts[7200:]
    common = dict(d_sae=64, k=3, lr=3e-3, batch_size=256, steps=steps, seed=0, device="cpu", log_every=steps)
    results: dict[str, dict[str, float]] = {}
    for name, cfg in {"mp_hier": MPConfig(**common), "batchtopk_hier": BatchTopKConfig(**common)}.items():
        t0 = time.perf_counter()
        dictionary = train_dictionary(cfg, train).dictionary
        learned = dictionary.decoder_directions()
        row: dict[str, float] = {}
        for kind in ("parents", "children", "singletons"):
            row |= {f"{kind}_{k}": v for k, v in recovery(getattr(toy, kind), learned).items()}
        results[name] = row | held_out_figures(dictionary, held_out)
        print(f"{name:14s} {results[name]}  ({time.perf_counter() - t0:.1f} s)")
    return results


def snmf_planted(draws: int) -> dict[str, dict[str, float]]:
    results: dict[str, dict[str, float]] = {}
    # Sparsifying from the first pass (no init passes), and with the default init passes.
    for name, init_passes in (("snmf_no_init_passes", 0), ("snmf", SemiNMFConfig().init_passes)):
        t0 = time.perf_counter()
        matched, cosines = 0, []
        for seed in range(draws):
            truth = planted_snmf(seed=seed)
            cfg = SemiNMFConfig(
                d_sae=8, sparsity=0.05, max_iters=300, batch_size=500, init_passes=init_passes
            )
            learned = train_dictionary(cfg, truth.acts).dictionary.decoder_directions()
            best = (torch.nn.functional.normalize(truth.F.T, dim=-1) @ learned.T).max(dim=1).values
            matched += int(best.min() > 0.99)
            cosines.append(best.min().item())
        results[name] = {
            "draws_all_matched_099": round(matched / draws, 4),
            "mean_min_cosine": round(sum(cosines) / draws, 4),
        }
        print(f"{name:14s} {results[name]}  ({time.perf_counter() - t0:.1f} s)")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and draws, for a smoke test")
    parser.add_argument("--d-sae", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = ba_toy(600 if args.quick else 4000, args.d_sae)
    results |= hierarchy(100 if args.quick else 300)
    results |= snmf_planted(2 if args.quick else 10)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
