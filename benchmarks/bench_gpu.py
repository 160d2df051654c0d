"""TopK-family training steps on a GPU against its peers, each over one dense bf16 matmul of the same run.

    python benchmarks/bench_gpu.py                 # CUDA: d_in 2304, k 64, batch 4096, d_sae 16384 and 65536
    python benchmarks/bench_gpu.py --device cpu    # small: d_in 64, k 8, batch 512, d_sae 512 and 1024
    python benchmarks/bench_gpu.py --d-sae 16384 --steps 10

Trainers, each a full optimizer step on the same random batch (loss, backward, decoder constraint, optimizer,
dead-latent bookkeeping):
  topk_fp32, topk_tf32, topk_bf16   featureatlas' TopK through its trainer's step (`_Member.train_step`):
                                    float32 matmuls in full precision (`tf32: false`), in TF32 (the default
                                    on CUDA), and under bf16 autocast (`autocast: bf16`);
  batchtopk_bf16, matryoshka_bf16   the rest of the family under bf16 autocast;
  topk_bf16_triton, topk_bf16_torch topk_bf16 with the sparse path's Triton kernels forced on (CUDA only)
                                    and off (tasks.dictionary.kernels); the rows above run the default
                                    (off, unless FEATUREATLAS_SPARSE_KERNELS says otherwise);
  sparsify                          EleutherAI's `SparseCoder` (bf16 autocast inside its forward, its Triton
                                    sparse decoder on CUDA), stepped as its trainer steps it, with Adam;
  dictionary_learning               `TopKTrainer.update` (float32).
Peers are optional (`pip install -e '.[peers]'`); one that does not import is skipped with its error printed.
Steps are interleaved: in every round each trainer takes one step right after one dense bf16
[batch, d_in] x [d_in, d_sae] matmul is timed, and `step_over_bf16_matmul` is the median ratio of the pairs,
so load drifts cancel. On CUDA `peak_gb` is the trainer's own weights and optimizer state plus the most its
step allocates above what was resting in memory; on CPU it is null. The last line is one JSON object:
{"d_sae=N": {trainer: {"tokens_per_s", "step_over_bf16_matmul", "peak_gb"}}, ...}.

Only torch, pydantic and the featureatlas dictionary code are imported (no Prefect, MLflow or database), so
it runs on a bare CUDA machine with the wheels of benchmarks/gpu/fetch_wheels.sh.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

FEATUREATLAS = (
    "topk_fp32",
    "topk_tf32",
    "topk_bf16",
    "batchtopk_bf16",
    "matryoshka_bf16",
    "topk_bf16_triton",
    "topk_bf16_torch",
)
PEERS = ("sparsify", "dictionary_learning")
# the kernel mode (tasks.dictionary.kernels) a trainer name's third part asks for; none: the default
KERNEL_MODES = {"triton": "on", "torch": "off"}


class Skipped(Exception):
    """A trainer that cannot run on this machine; the reason is printed and the others go on."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def featureatlas_step(name: str, args, device: torch.device, x: torch.Tensor) -> Callable[[int], None]:
    from pydantic import TypeAdapter

    from featureatlas.schemas.methods import DictionaryConfig
    from featureatlas.tasks.dictionary.kernels import sparse_kernels, triton_available
    from featureatlas.tasks.dictionary.train import _Member

    method, precision, *path = name.split("_")
    mode = KERNEL_MODES[path[0]] if path else None
    if mode == "on" and (device.type != "cuda" or not triton_available()):
        raise Skipped("the Triton kernels need CUDA and Triton")
    fields = {"method": method, "d_sae": args.d_sae, "k": args.k, "batch_size": args.batch}
    fields |= {"steps": 10**9, "log_every": 10**9, "device": str(device)}
    fields |= {"fp32": {"tf32": False}, "tf32": {"tf32": True}, "bf16": {"autocast": "bf16"}}[precision]
    cfg = TypeAdapter(DictionaryConfig).validate_python(fields)
    member = _Member(cfg, x.shape[1], 10**9, device, None, None)
    member.prepare(x[:1024].cpu())
    if mode is None:
        return lambda step: member.train_step(x, step)

    def step(step: int) -> None:
        with sparse_kernels(mode):
            member.train_step(x, step)

    return step


def sparsify_step(args, device: torch.device, x: torch.Tensor) -> Callable[[int], None]:
    from sparsify import SparseCoder, SparseCoderConfig

    sae = SparseCoder(x.shape[1], SparseCoderConfig(num_latents=args.d_sae, k=args.k), device=device)
    opt = torch.optim.Adam(sae.parameters(), lr=2e-4 * (2**14 / args.d_sae) ** 0.5)
    did_fire = torch.zeros(args.d_sae, dtype=torch.bool, device=device)

    def step(_step: int) -> None:
        out = sae(x, dead_mask=None)
        did_fire[out.latent_indices.flatten()] = True
        out.fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sae.set_decoder_norm_to_unit_norm()

    return step


def dictionary_learning_step(args, device: torch.device, x: torch.Tensor) -> Callable[[int], None]:
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_peers import import_dictionary_learning_topk

    top_k = import_dictionary_learning_topk()
    trainer = top_k.TopKTrainer(
        steps=10**9,
        activation_dim=x.shape[1],
        dict_size=args.d_sae,
        k=args.k,
        layer=0,
        lm_name="random",
        warmup_steps=0,
        seed=0,
        device=str(device),
    )
    return lambda step: trainer.update(step, x)


def build(name: str, args, device: torch.device, x: torch.Tensor) -> Callable[[int], None]:
    if name in FEATUREATLAS:
        return featureatlas_step(name, args, device, x)
    if name == "sparsify":
        return sparsify_step(args, device, x)
    if name == "dictionary_learning":
        return dictionary_learning_step(args, device, x)
    raise ValueError(f"unknown trainer {name!r}; choose from {', '.join(FEATUREATLAS + PEERS)}")


def run_size(args, device: torch.device, names: list[str]) -> dict[str, dict[str, float | None]]:
    """Every trainer at one d_sae, steps interleaved with the bf16 matmul; results keyed by trainer."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, args.d_in, generator=g).to(device)
    x_bf16 = x.to(torch.bfloat16)
    w_bf16 = torch.randn(args.d_in, args.d_sae, generator=g).to(device, torch.bfloat16)
    steps, state_bytes = {}, {}
    for name in names:
        before = _allocated(device)
        try:
            steps[name] = build(name, args, device, x)
            for s in range(1, args.warmup + 1):  # allocates optimizer state, compiles kernels
                steps[name](s)
        except Skipped as why:
            print(f"{name}: skipped, {why}", flush=True)
            steps.pop(name, None)
            continue
        except ImportError as err:
            print(f"{name}: skipped, it does not import ({err}); pip install -e '.[peers]'", flush=True)
            steps.pop(name, None)
            continue
        except RuntimeError as err:
            if name in FEATUREATLAS:
                raise
            # a peer that cannot run here (e.g. sparsify's Triton decoder on a machine without a GPU)
            print(f"{name}: skipped, it fails on {device}: {str(err).splitlines()[0]}", flush=True)
            steps.pop(name, None)
            continue
        _sync(device)
        state_bytes[name] = _allocated(device) - before
    matmul = lambda: x_bf16 @ w_bf16  # noqa: E731
    _timed(matmul, device)
    times: dict[str, list[float]] = {n: [] for n in steps}
    ratios: dict[str, list[float]] = {n: [] for n in steps}
    peaks: dict[str, int] = dict.fromkeys(steps, 0)
    for r in range(args.steps):
        for name, step in steps.items():
            mm = _timed(matmul, device)
            resting = _allocated(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t = _timed(lambda step=step, r=r: step(args.warmup + 1 + r), device)
            if device.type == "cuda":
                peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated(device) - resting)
            times[name].append(t)
            ratios[name].append(t / mm)
    results = {}
    for name in steps:
        peak = None
        if device.type == "cuda":
            peak = round((state_bytes[name] + peaks[name]) / 2**30, 2)
        results[name] = {
            "tokens_per_s": round(args.batch / statistics.median(times[name]), 1),
            "step_over_bf16_matmul": round(statistics.median(ratios[name]), 2),
            "peak_gb": peak,
        }
    del steps
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--d-in", type=int, default=None, help="default: 2304 on CUDA, 64 on CPU")
    parser.add_argument("--d-sae", type=int, action="append", default=None, help="repeatable")
    parser.add_argument("--k", type=int, default=None, help="default: 64 on CUDA, 8 on CPU")
    parser.add_argument("--batch", type=int, default=None, help="default: 4096 on CUDA, 512 on CPU")
    parser.add_argument("--steps", type=int, default=None, help="timed rounds (default 20 CUDA, 3 CPU)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--trainers", default=",".join(FEATUREATLAS + PEERS))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    args.d_in = args.d_in or (2304 if cuda else 64)
    args.k = args.k or (64 if cuda else 8)
    args.batch = args.batch or (4096 if cuda else 512)
    args.steps = args.steps or (20 if cuda else 3)
    sizes = args.d_sae or ([16384, 65536] if cuda else [512, 1024])
    names = [n for n in args.trainers.split(",") if n]
    where = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"{where}; torch {torch.__version__}; d_in {args.d_in}, k {args.k}, batch {args.batch}")
    report = {}
    for d_sae in sizes:
        args.d_sae = d_sae
        rows = run_size(args, device, names)
        print(f"d_sae {d_sae}:  {'trainer':<20} {'tokens/s':>11} {'step/bf16 mm':>13} {'peak GB':>8}")
        for name, row in rows.items():
            peak = "-" if row["peak_gb"] is None else f"{row['peak_gb']:.2f}"
            print(
                f"{'':<13}{name:<20} {row['tokens_per_s']:>11.0f} {row['step_over_bf16_matmul']:>13.2f} "
                f"{peak:>8}",
                flush=True,
            )
        report[f"d_sae={d_sae}"] = rows
    print(json.dumps(report))


if __name__ == "__main__":
    main()
