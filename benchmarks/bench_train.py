"""Training-step speed of every SAE variant against the floor of one dense encoder matmul.

For each method: tokens/s of a full training step (loss, backward, the method's decoder constraint, AdamW),
the peak memory of that step, and `matmul_ratio` = step time / time of one dense [batch, d_in] x [d_in, d_sae]
matmul measured in the same process, alternating with the steps (a dense step needs ~6 such matmuls: the
encoder and decoder and two each in their backward passes). The TopK family runs on its sparse path
(tasks/dictionary/sparse_decoder.py: only the k selected decoder rows are gathered, and the encoder gradient
is built from the selected entries), which leaves one dense matmul, the encoder's forward; `<method>_dense`
rows time the same method on the dense path. The batch is random, so no latent is dead and AuxK is off.
GBA and BA steps include their bias rule's bookkeeping (the rule itself runs every `update_every` steps).
Semi-NMF is not gradient-trained: its "step" is one pass of its alternation over the batch (least-squares
F with its d_sae x d_sae solve, the sparsification, the multiplicative G update), the unit its `fit` repeats
over the tokens.
Each method runs in its own subprocess so that its peak memory is its own: on CUDA
`torch.cuda.max_memory_allocated`; on CPU the rise of the process's max RSS over its size just before the
dictionary is built (model, optimizer state and the step's intermediates; the input batch and the torch
runtime excluded).

    python benchmarks/bench_train.py                 # d_in 576, d_sae 4608, batch 4096, CPU, all threads
    python benchmarks/bench_train.py --d-sae 1152    # smaller, e.g. on a slow CPU
    python benchmarks/bench_train.py --device cuda   # on a GPU

The last line printed is one JSON object keyed by method; a method whose child process failed is printed
with the end of its error output and appears as {"error": ...}.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

METHODS = (
    "topk",
    "topk_dense",
    "batchtopk",
    "batchtopk_dense",
    "matryoshka",
    "matryoshka_dense",
    "relu",
    "jumprelu",
    "gated",
    "threshold",
    "mp",
    "gba",
    "ba",
    "snmf",
)
# The TopK family trains on its sparse path by default; `<method>_dense` times it on the dense path.
DENSE_SUFFIX = "_dense"


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _median_seconds(fn, repeats: int, device: str) -> float:
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _rss_mb() -> float:
    """Current resident set size (Linux /proc), in MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def run_one(method: str, args: argparse.Namespace) -> dict[str, float]:
    """Time `args.steps` training steps of `method` (after one warm-up step) in this process."""
    import torch
    from pydantic import TypeAdapter

    from featureatlas.schemas.methods import DictionaryConfig
    from featureatlas.tasks.dictionary import build_dictionary

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    g = torch.Generator().manual_seed(0)
    acts = torch.randn(args.batch, args.d_in, generator=g).to(device)
    weight = torch.randn(args.d_in, args.d_sae, generator=g).to(device)

    method, dense = method.removesuffix(DENSE_SUFFIX), method.endswith(DENSE_SUFFIX)
    fields = {"method": method, "d_sae": args.d_sae, "device": device}
    if method in ("topk", "batchtopk", "matryoshka", "mp"):
        fields["k"] = args.k
    cfg = TypeAdapter(DictionaryConfig).validate_python(fields)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    rss_before = _rss_mb()
    if method == "snmf":
        step = _snmf_pass(cfg, acts)
    else:
        sae = build_dictionary(cfg, args.d_in)
        if hasattr(sae, "sparse_decoder"):
            sae.sparse_decoder = not dense
        sae.init_from_data(acts.cpu())
        sae.to(device).train()
        optimizer = torch.optim.AdamW([p for p in sae.parameters() if p.requires_grad], lr=cfg.lr)
        dead = torch.zeros(args.d_sae, dtype=torch.bool, device=device)

        def step() -> None:
            out = sae.training_loss(acts, dead)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            sae.before_optimizer_step()
            optimizer.step()
            sae.after_optimizer_step()

    step()  # warm-up: allocates optimizer state and caches kernels
    _median_seconds(lambda: acts @ weight, 1, device)
    # Matmul and step alternate, and the ratio is taken per pair: on a shared machine the load drifts, and
    # a matmul timed minutes before the steps would measure a different machine.
    step_times, matmul_times = [], []
    for _ in range(args.steps):
        matmul_times.append(_median_seconds(lambda: acts @ weight, 1, device))
        step_times.append(_median_seconds(step, 1, device))
    step_s, matmul_s = statistics.median(step_times), statistics.median(matmul_times)
    ratio = statistics.median(s / m for s, m in zip(step_times, matmul_times))
    if device.startswith("cuda"):
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss_before
    return {
        "tokens_per_s": round(args.batch / step_s, 1),
        "step_ms": round(step_s * 1e3, 2),
        "matmul_ms": round(matmul_s * 1e3, 2),
        "matmul_ratio": round(ratio, 2),
        "peak_mb": round(peak_mb, 1),
    }


def _snmf_pass(cfg, acts):
    """One semi-NMF pass over `acts` as `fit_snmf` makes it, with G kept between passes."""
    import torch

    from featureatlas.tasks.dictionary.snmf import least_squares_F, multiplicative_update, sparse_F

    G = torch.rand(acts.shape[0], cfg.d_sae, generator=torch.Generator().manual_seed(0), device=acts.device)
    total_sq = float(acts.pow(2).sum())
    F_prev = None

    def step() -> None:
        nonlocal F_prev
        F_ls, sums = least_squares_F(acts, G, acts.shape[0], 1.0)
        F = sparse_F(cfg, F_ls, F_prev, sums, total_sq)
        G.copy_(multiplicative_update(G, acts @ F, F.T @ F))
        F_prev = F

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--d-in", type=int, default=576)
    parser.add_argument("--d-sae", type=int, default=4608)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32, help="k of the TopK family")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per method (median reported)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print(json.dumps(run_one(args.child, args)))
        return

    root = Path(__file__).resolve().parents[1]
    passthrough = [
        f"--d-in={args.d_in}",
        f"--d-sae={args.d_sae}",
        f"--batch={args.batch}",
        f"--k={args.k}",
        f"--steps={args.steps}",
        f"--threads={args.threads}",
        f"--device={args.device}",
    ]
    results: dict[str, dict[str, float]] = {}
    print(f"d_in {args.d_in}, d_sae {args.d_sae}, batch {args.batch}, k {args.k}, device {args.device}")
    print(f"{'method':<17} {'tokens/s':>10} {'step ms':>9} {'matmul ms':>10} {'ratio':>6} {'peak MB':>8}")
    for method in args.methods.split(","):
        proc = subprocess.run(
            [sys.executable, __file__, *passthrough, "--child", method],
            capture_output=True,
            text=True,
            cwd=root,
            env={"PYTHONPATH": str(root), **_env()},
        )
        if proc.returncode != 0:
            # a method that fails is reported with its error, and the others still run
            tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
            print(f"{method:<17} FAILED (exit {proc.returncode}):\n{tail}", flush=True)
            errors = [line for line in tail.splitlines() if "Error" in line or "Exception" in line]
            results[method] = {"error": (errors or [f"exit {proc.returncode}"])[-1].strip()}
            continue
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        results[method] = row
        print(
            f"{method:<17} {row['tokens_per_s']:>10.0f} {row['step_ms']:>9.1f} {row['matmul_ms']:>10.1f} "
            f"{row['matmul_ratio']:>6.2f} {row['peak_mb']:>8.0f}",
            flush=True,
        )
    keys = ("tokens_per_s", "matmul_ratio", "peak_mb")
    print(json.dumps({m: r if "error" in r else {k: r[k] for k in keys} for m, r in results.items()}))


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


if __name__ == "__main__":
    main()
