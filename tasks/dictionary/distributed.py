"""Data-parallel dictionary training over several processes with DistributedDataParallel (`torchrun`).

Every rank draws the same global batches (one seeded generator, as `train.py` draws them) and trains on its
contiguous share of each: rank r of W takes rows [r*B/W, (r+1)*B/W). DDP averages the ranks' gradients, so a
step is the step one process takes when it accumulates the mean gradient of the same W micro-batches; with
W = 1 it is `train.train_dictionary`'s step. Dead-latent bookkeeping is global (the ranks OR their "fired"
masks), the initialisation from data happens on every rank from the same rows and DDP broadcasts rank 0's
parameters and buffers, so the ranks never drift apart. Each loss term is normalised by its micro-batch's
statistics (the batch FVU), which is why the reference is "the same micro-batches in one process", not one
big batch.

    torchrun --nproc-per-node 2 -m tasks.dictionary.distributed \\
        --cache ARTIFACTS/activation_cache/cache-... --hookpoint model.layers.6 --config cfg.json --out DIR

The pipeline launches it so (`tasks.dictionary.launch`) for a dictionary whose config sets `nproc_per_node`.

GPU ranks use NCCL and the GPU `LOCAL_RANK` names; CPU ranks use gloo (how the tests run it). Methods with
updates outside the gradient (`after_step`, GBA) or their own `fit` (semi-NMF) are refused: their state would
be per-rank.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from pydantic import TypeAdapter
from torch import Tensor, nn
from torch.distributed.elastic.multiprocessing.errors import record
from torch.nn.parallel import DistributedDataParallel

from featureatlas.schemas.methods import DictionaryConfig
from featureatlas.tasks.dictionary.base import TrainStepOutput
from featureatlas.tasks.dictionary.data import validate_acts
from featureatlas.tasks.dictionary.registry import METHODS, build_dictionary
from featureatlas.tasks.dictionary.train import MetricsCallback, TrainResult, check_loss, lr_factor


class _LossModule(nn.Module):
    """The dictionary's training loss as `forward`, so DDP sees (and synchronises) every step."""

    def __init__(self, dictionary: nn.Module) -> None:
        super().__init__()
        self.dictionary = dictionary

    def forward(self, acts: Tensor, dead_mask: Tensor):
        return tuple(self.dictionary.training_loss(acts, dead_mask))


# Logged per step as the mean over the ranks' shares; with the trainer's dead_fraction and lr they are the
# metrics `train.train_dictionaries` logs.
_STATS = ("loss", "mse", "fvu", "l0", "auxk_loss")


def _step_stats(out: TrainStepOutput) -> Tensor:
    l0 = (out.codes > 0).sum(-1).float().mean()
    values = (out.loss.detach(), out.mse, out.fvu, l0, out.auxk_loss)
    return torch.stack([v.detach().double() for v in values])


def _name(cfg: DictionaryConfig) -> str:
    return f"{cfg.method} (d_sae={cfg.d_sae})"


def _global_batches(n: int, batch_size: int, seed: int) -> Iterator[Tensor]:
    """Row indices of full batches from back-to-back seeded permutations (the order `train.py` uses)."""
    generator = torch.Generator().manual_seed(seed)
    pending = torch.empty(0, dtype=torch.long)
    while True:
        while len(pending) < batch_size:
            pending = torch.cat([pending, torch.randperm(n, generator=generator)])
        yield pending[:batch_size]
        pending = pending[batch_size:]


def _check_method(cfg: DictionaryConfig) -> None:
    cls = METHODS.get(cfg.method)
    if cls is None or getattr(cls, "fit", None) is not None or hasattr(cls, "after_step"):
        raise ValueError(
            f"method {cfg.method!r} cannot train data-parallel: its updates outside the gradient would "
            "differ per rank; train it in one process (train.train_dictionary)"
        )


def train_data_parallel(
    cfg: DictionaryConfig,
    acts: Tensor,
    *,
    world_size: int | None = None,
    on_metrics: MetricsCallback | None = None,
) -> TrainResult:
    """Train `cfg` on `acts` [n, d_in] (the same rows on every rank), each rank on its share of each batch.

    Inside an initialised process group (torchrun) this is DDP over the group; outside one, `world_size`
    micro-batches per step are accumulated in this process, which is the reference DDP must reproduce.
    """
    validate_acts(acts)
    _check_method(cfg)
    distributed = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if distributed else (world_size or 1)
    ranks = [dist.get_rank()] if distributed else list(range(world))
    n, d_in = acts.shape
    batch_size = min(cfg.batch_size, n)
    if batch_size % world:
        raise ValueError(
            f"batch_size {batch_size} does not split over {world} ranks; use a multiple of {world}"
        )
    share = batch_size // world
    steps = cfg.steps or cfg.epochs * math.ceil(n / batch_size)
    device = _rank_device(cfg) if distributed else torch.device("cpu")
    dead_tokens = getattr(cfg, "dead_tokens", n)

    dictionary = build_dictionary(cfg, d_in)
    dictionary.init_from_data(acts)
    dictionary.to(device).train()
    module: nn.Module = _LossModule(dictionary)
    if distributed:
        ids = [device.index] if device.type == "cuda" else None
        module = DistributedDataParallel(module, device_ids=ids, find_unused_parameters=True)
    params = [p for p in dictionary.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    batches = _global_batches(n, batch_size, cfg.seed)
    tokens_since_fired = torch.zeros(dictionary.d_sae, dtype=torch.long, device=device)

    metrics: dict[str, float] = {}
    first_loss: float | None = None
    for step in range(1, steps + 1):
        batch = acts[next(batches)]
        dead_mask = tokens_since_fired >= dead_tokens
        optimizer.zero_grad(set_to_none=True)
        fired = torch.zeros(dictionary.d_sae, dtype=torch.bool, device=device)
        stats = torch.zeros(len(_STATS), dtype=torch.float64, device=device)
        for rank in ranks:
            out = TrainStepOutput(*module(batch[rank * share : (rank + 1) * share].to(device), dead_mask))
            # DDP averages gradients over ranks; accumulating here must average the same way
            (out.loss if distributed else out.loss / world).backward()
            fired |= (out.codes > 0).any(0)
            stats += _step_stats(out)
        if distributed:
            flags = fired.to(torch.int32)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            fired = flags.bool()
        dictionary.before_optimizer_step()
        lr = cfg.lr * lr_factor(step, steps, cfg.warmup_steps, cfg.decay_fraction)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        dictionary.after_optimizer_step()
        tokens_since_fired += batch_size
        tokens_since_fired[fired] = 0
        logged = step % cfg.log_every == 0 or step == steps
        if step == 1 or logged:
            # the mean over the W shares, the same on every rank, so every rank stops at the same step
            if distributed:
                dist.all_reduce(stats)
            means = dict(zip(_STATS, (stats / world).tolist()))
            if step == 1:
                first_loss = means["loss"]
                check_loss(first_loss, step, None, _name(cfg))
        if logged:
            check_loss(means["loss"], step, first_loss, _name(cfg))
            dead = (tokens_since_fired >= dead_tokens).float().mean().item()
            metrics = means | {"dead_fraction": dead, "lr": lr}
            if on_metrics is not None and ranks[0] == 0:
                on_metrics(metrics, step)
    return TrainResult(dictionary=dictionary.cpu().eval(), final_metrics=metrics, steps=steps)


def _rank_device(cfg: DictionaryConfig) -> torch.device:
    if torch.cuda.is_available() and cfg.device != "cpu":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def _load_acts(args: argparse.Namespace) -> Tensor:
    if args.acts is not None:
        from safetensors.torch import load_file

        return load_file(args.acts)["acts"]
    from featureatlas.tasks.common.store import ActivationCache

    store = ActivationCache(args.cache)
    return store.load(args.hookpoint, store.selection("train"))


def _metrics_writer(path: str | None) -> MetricsCallback | None:
    """A callback appending {"step", "metrics"} JSON lines to `path` (rank 0 calls it), flushed each time."""
    if path is None:
        return None

    def write(metrics: dict[str, float], step: int) -> None:
        with open(path, "a") as f:
            f.write(json.dumps({"step": step, "metrics": metrics}) + "\n")

    return write


def _with_world_size(cfg: DictionaryConfig, world: int) -> DictionaryConfig:
    """`cfg` recording the processes it trains in (so its cfg.json says so); a different count is refused."""
    if cfg.nproc_per_node not in (1, world):
        raise ValueError(
            f"the config asks for nproc_per_node={cfg.nproc_per_node}, but torchrun started {world} "
            f"processes; launch with --nproc-per-node {cfg.nproc_per_node} or change the config"
        )
    raw = cfg.model_dump(mode="json") | {"nproc_per_node": world}
    return TypeAdapter(DictionaryConfig).validate_python(raw)


@record  # a failing rank's traceback goes into torchrun's error report, not only its own stderr
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Data-parallel dictionary training; launch with torchrun.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--cache", help="Activation cache folder (its training split is used).")
    source.add_argument("--acts", help="A safetensors file holding one [n, d_in] tensor named 'acts'.")
    parser.add_argument("--hookpoint", help="Hookpoint to train on (with --cache).")
    parser.add_argument("--config", required=True, help="JSON file of the dictionary config.")
    parser.add_argument("--out", required=True, help="Folder for cfg.json + weights.safetensors (rank 0).")
    parser.add_argument("--metrics", help="JSON-lines file for the logged metrics of each step (rank 0).")
    args = parser.parse_args(argv)
    if args.cache is not None and args.hookpoint is None:
        parser.error("--cache needs --hookpoint")
    cfg = TypeAdapter(DictionaryConfig).validate_python(json.loads(Path(args.config).read_text()))
    backend = "nccl" if torch.cuda.is_available() and cfg.device != "cpu" else "gloo"
    dist.init_process_group(backend)
    try:
        cfg = _with_world_size(cfg, dist.get_world_size())
        result = train_data_parallel(cfg, _load_acts(args), on_metrics=_metrics_writer(args.metrics))
        if dist.get_rank() == 0:
            result.dictionary.save(Path(args.out))
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
