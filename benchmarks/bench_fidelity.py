"""Fidelity at defaults: does every dictionary method, left at its documented defaults, recover planted truth?

Each method is given only `d_sae`, `k` (where it has one), `steps` and `batch_size`; everything else is its
config's default. Two planted families of different sizes (`synthetic.sparse_toy`, seeded apart from every
method's initialisation):

    small  48 features in 24 dimensions, each on 6% of tokens (2.9 per token), coefficients U[0.5, 1.5)
    mixed  160 features in 64 dimensions, rates log-uniform in 0.5%-5% (3.3 per token), coefficients U[0.2, 2)

d_sae is twice the number of features; k is the family's mean number of active features, rounded (3). For
each method and family: recovery of the planted directions at cosine 0.8 / 0.9 (`frr_08`, `frr_09`), and on
a held-out sample drawn from the same features, through the inference path (`encode`/`decode` in eval mode,
`reconstruction_metrics`: BatchTopK's threshold, not the training batch's top-k) the FVU, the L0 and the
share of latents that never fire (`dead`); `at_init` is the recovery before any step (must stay ~0: the
toy is not the initialisation).

Run: `python benchmarks/bench_fidelity.py [--steps N] [--methods a,b] [--families small,mixed]`; CPU, one
thread. The last line is one JSON object keyed by method, then family, with `frr_08`, `frr_09`, `fvu`, `l0`
(and `dead`, `at_init`, `seconds`).
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import torch
from pydantic import TypeAdapter

from featureatlas.schemas.methods import DictionaryConfig
from featureatlas.tasks.dictionary import train_dictionary
from featureatlas.tasks.dictionary.synthetic import SparseToy, recovery, recovery_at_init, sparse_toy
from featureatlas.tasks.evaluate.metrics import reconstruction_metrics

log = logging.getLogger("bench_fidelity")

FAMILIES = {
    "small": dict(n_features=48, d_in=24, freq_range=(0.06, 0.06), coef_range=(0.5, 1.5)),
    "mixed": dict(n_features=160, d_in=64, freq_range=(0.005, 0.05), coef_range=(0.2, 2.0)),
}
METHODS = (
    *("topk", "batchtopk", "matryoshka", "mp"),
    *("relu", "jumprelu", "gated", "threshold"),
    *("gba", "ba", "snmf"),
)
WITH_K = ("topk", "batchtopk", "matryoshka", "mp")
N_TRAIN, N_HELD_OUT = 40_000, 8_000


def config(method: str, toy: SparseToy, steps: int, batch_size: int) -> DictionaryConfig:
    """The method's defaults, given only d_sae, k (where it has one), steps and batch size."""
    fields = dict(method=method, d_sae=2 * len(toy.freq), steps=steps, batch_size=batch_size, device="cpu")
    if method in WITH_K:
        fields["k"] = max(1, round(float(toy.freq.sum())))
    return TypeAdapter(DictionaryConfig).validate_python(fields | {"log_every": steps})


def run(method: str, toy: SparseToy, train: torch.Tensor, held_out: torch.Tensor, args) -> dict[str, float]:
    cfg = config(method, toy, args.steps, args.batch_size)
    t0 = time.perf_counter()
    at_init = recovery_at_init(cfg, train, toy.features)["frr_08"]
    dictionary = train_dictionary(cfg, train).dictionary
    with torch.no_grad():
        m = reconstruction_metrics(dictionary, held_out)
    row = recovery(toy.features, dictionary.decoder_directions())
    return row | {
        "fvu": round(m.fvu, 4),
        "l0": round(m.l0, 2),
        "dead": round(m.dead_fraction, 3),
        "at_init": at_init,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--families", default=",".join(FAMILIES))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    results: dict[str, dict[str, dict[str, float]]] = {}
    for family in args.families.split(","):
        toy = sparse_toy(**FAMILIES[family], seed=0)
        train, held_out = toy.sample(N_TRAIN, seed=0), toy.sample(N_HELD_OUT, seed=1)
        n_features, d_in = toy.features.shape
        print(f"-- {family}: {n_features} features, d_in {d_in}, {toy.freq.sum():.1f} per token", flush=True)
        for method in args.methods.split(","):
            row = run(method, toy, train, held_out, args)
            results.setdefault(method, {})[family] = row
            print(f"{method:11s} {family:6s} {row}", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
