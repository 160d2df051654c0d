"""Train a gradient-based dictionary on cached activations: seeded, minibatched AdamW with live metrics.

The loop is method-agnostic. A method supplies its losses and its constraints through the `Trainable` hooks
(`init_from_data`, `training_loss`, `before_optimizer_step`, `after_optimizer_step`, and optionally
`after_step(step)` for updates outside the gradient, such as bias adaptation); this module owns the
data order, the device, the optimizer and its learning-rate schedule (linear warm-up, constant, linear
decay), dead-latent bookkeeping, the check that the loss stays finite and bounded, and the metrics handed to
`on_metrics` (MLflow in the flow).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from schemas.methods import DictionaryConfig
from tasks.dictionary.base import Dictionary, TrainStepOutput
from tasks.dictionary.registry import METHODS, build_dictionary

logger = logging.getLogger(__name__)

MetricsCallback = Callable[[dict[str, float], int], None]


@runtime_checkable
class Trainable(Protocol):
    """The hooks a dictionary needs for `train_dictionary`, on top of the `Dictionary` interface."""

    def init_from_data(self, acts: Tensor) -> None: ...

    def training_loss(self, acts: Tensor, dead_mask: Tensor) -> TrainStepOutput: ...

    def before_optimizer_step(self) -> None: ...

    def after_optimizer_step(self) -> None: ...


@dataclass(frozen=True)
class TrainResult:
    """A trained dictionary (on CPU, eval mode), the metrics of its last step, and the steps taken."""

    dictionary: Dictionary
    final_metrics: dict[str, float]
    steps: int


def resolve_device(spec: str) -> torch.device:
    """'auto' -> CUDA when present, else CPU; 'cpu' and 'cuda[:N]' as given, checked against the machine."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as err:
        raise ValueError(f"device {spec!r} is not a device; use 'auto', 'cpu' or 'cuda[:N]'") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {spec!r} asked for, but this machine has no CUDA; use 'auto' or 'cpu'")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(
            f"device {spec!r} asked for, but only {torch.cuda.device_count()} GPU(s) are visible"
        )
    return device


def validate_acts(acts: Tensor, chunk_rows: int = 65_536) -> None:
    """Refuse activations that training cannot use, saying how to fix them."""
    if not isinstance(acts, Tensor):
        raise TypeError(f"acts must be a torch.Tensor, got {type(acts).__name__}; use torch.from_numpy(...)")
    if acts.ndim != 2:
        raise ValueError(
            f"acts must be [n_tokens, d_in], got shape {tuple(acts.shape)}; "
            "flatten with acts.reshape(-1, acts.shape[-1])"
        )
    if not acts.is_floating_point():
        raise ValueError(f"acts must be floating point, got {acts.dtype}; cast with acts.float()")
    if acts.shape[0] < 2 or acts.shape[1] < 1:
        raise ValueError(f"acts has shape {tuple(acts.shape)}; training needs >= 2 tokens and d_in >= 1")
    # Chunked so a large cache is not doubled in memory by one boolean mask.
    for start in range(0, acts.shape[0], chunk_rows):
        finite = torch.isfinite(acts[start : start + chunk_rows]).all(dim=1)
        if not bool(finite.all()):
            row = start + int((~finite).nonzero()[0])
            raise ValueError(f"acts row {row} holds NaN or inf; drop or recompute those rows before training")


def _minibatches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Row indices, batch after batch, from back-to-back shuffled passes over the data.

    A batch may straddle two passes so that every batch is full: a one-row tail batch would have zero
    variance, leaving the FVU undefined.
    """
    pending = torch.empty(0, dtype=torch.long)
    while True:
        while len(pending) < batch_size:
            pending = torch.cat([pending, torch.randperm(n, generator=generator)])
        yield pending[:batch_size]
        pending = pending[batch_size:]


def lr_factor(step: int, steps: int, warmup_steps: int, decay_fraction: float) -> float:
    """Multiplier of the peak lr at optimizer step `step` (1-based): warm-up, flat, decay to 0."""
    factor = 1.0
    if warmup_steps > 0:
        factor = min(factor, step / warmup_steps)
    decay_steps = int(decay_fraction * steps)
    if decay_steps > 0:
        factor = min(factor, (steps - step + 1) / decay_steps)
    return factor


# A loss this many times above the first step's means the run has diverged; no sane schedule climbs so far.
DIVERGENCE_FACTOR = 1e3


def check_loss(loss: float, step: int, first_loss: float | None) -> None:
    """Stop with the step named when the loss is NaN/inf or exploded past DIVERGENCE_FACTOR x its start."""
    if not math.isfinite(loss):
        raise FloatingPointError(
            f"loss became {loss} at step {step}; lower the learning rate (lr) or add warmup_steps"
        )
    if first_loss is not None and loss > DIVERGENCE_FACTOR * max(first_loss, 1e-6):
        raise FloatingPointError(
            f"loss diverged at step {step}: {loss:.3g}, over {DIVERGENCE_FACTOR:g}x the first step's "
            f"{first_loss:.3g}; lower the learning rate (lr) or add warmup_steps"
        )


def train_dictionary(
    cfg: DictionaryConfig,
    acts: Tensor,
    *,
    on_metrics: MetricsCallback | None = None,
    progress: bool = False,
    targets: Tensor | None = None,
) -> TrainResult:
    """Train the dictionary `cfg` describes on `acts` [n, d_in] (CPU, any float dtype; it stays there).

    Steps: `cfg.steps`, else `cfg.epochs` x ceil(n / batch_size). Every `cfg.log_every` steps and at the
    last one, `on_metrics(metrics, step)` gets loss, mse (raw units), fvu, l0, dead_fraction, auxk_loss and
    lr. The loss is checked at the first step and every logged step: NaN, inf or a blow-up past
    DIVERGENCE_FACTOR x the first loss raise FloatingPointError naming the step.
    A transcoder (`cfg.target_hookpoint` set) also takes `targets` [n, d_in]: the target hookpoint's
    activations, row i of the same token as row i of acts; each batch takes the same rows of both.
    """
    validate_acts(acts)
    if (targets is None) != (cfg.target_hookpoint is None):
        given = "absent" if targets is None else "given"
        raise ValueError(
            "a transcoder (target_hookpoint set) needs `targets`, and only a transcoder takes them; "
            f"got target_hookpoint={cfg.target_hookpoint!r} and targets {given}"
        )
    if targets is not None:
        validate_acts(targets)
        if targets.shape != acts.shape:
            raise ValueError(
                f"targets {tuple(targets.shape)} must match acts {tuple(acts.shape)} row for row; load both "
                "hookpoints with the same rows (transcoders between sites of different widths are not built)"
            )
    # A method that is not gradient-trained (semi-NMF) brings its own `fit` with this function's signature.
    own_fit = getattr(METHODS.get(cfg.method), "fit", None)
    if own_fit is not None:
        return own_fit(cfg, acts, on_metrics=on_metrics, progress=progress)
    n, d_in = acts.shape
    batch_size = min(cfg.batch_size, n)
    steps = cfg.steps or cfg.epochs * math.ceil(n / batch_size)
    device = resolve_device(cfg.device)
    # Methods without a dead-latent threshold count a latent dead after a whole pass without firing.
    dead_tokens = getattr(cfg, "dead_tokens", n)

    dictionary = build_dictionary(cfg, d_in)
    if not isinstance(dictionary, Trainable):
        raise TypeError(f"method {cfg.method!r} lacks the Trainable hooks that train_dictionary needs")
    if targets is None:
        dictionary.init_from_data(acts)
    else:
        dictionary.init_from_data(acts, targets)
    dictionary.to(device).train()
    # Optional hook, run after each complete step (1-based), e.g. GBA's every-T-steps bias update.
    after_step = getattr(dictionary, "after_step", None)
    # Frozen parameters (a bias-free method's zero biases) stay out of the optimizer and its weight decay.
    params = [p for p in dictionary.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    batches = _minibatches(n, batch_size, torch.Generator().manual_seed(cfg.seed))
    tokens_since_fired = torch.zeros(dictionary.d_sae, dtype=torch.long, device=device)
    logger.info(
        "training %s: n=%d d_in=%d d_sae=%d batch=%d steps=%d on %s",
        cfg.method,
        n,
        d_in,
        dictionary.d_sae,
        batch_size,
        steps,
        device,
    )

    metrics: dict[str, float] = {}
    first_loss: float | None = None
    bar = tqdm(range(1, steps + 1), desc=f"train {cfg.method}", disable=not progress)
    for step in bar:
        index = next(batches)
        batch = acts[index].to(device, non_blocking=True)
        dead = tokens_since_fired >= dead_tokens
        if targets is None:
            out = dictionary.training_loss(batch, dead)
        else:
            out = dictionary.training_loss(batch, dead, targets[index].to(device, non_blocking=True))
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        dictionary.before_optimizer_step()
        lr = cfg.lr * lr_factor(step, steps, cfg.warmup_steps, cfg.decay_fraction)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        dictionary.after_optimizer_step()
        if after_step is not None:
            after_step(step)

        tokens_since_fired += batch.shape[0]
        tokens_since_fired[(out.codes > 0).any(0)] = 0
        # Metrics are read back only when logged: each .item() waits for the GPU.
        if step == 1:
            first_loss = out.loss.item()
            check_loss(first_loss, step, None)
        if step % cfg.log_every == 0 or step == steps:
            check_loss(out.loss.item(), step, first_loss)
            metrics = {
                "loss": out.loss.item(),
                "mse": out.mse.item(),
                "fvu": out.fvu.item(),
                "l0": (out.codes > 0).sum(-1).float().mean().item(),
                "dead_fraction": (tokens_since_fired >= dead_tokens).float().mean().item(),
                "auxk_loss": out.auxk_loss.item(),
                "lr": lr,
            }
            bar.set_postfix(fvu=f"{metrics['fvu']:.4f}", l0=f"{metrics['l0']:.1f}")
            if on_metrics is not None:
                on_metrics(metrics, step)

    logger.info("trained %s in %d steps: %s", cfg.method, steps, metrics)
    return TrainResult(dictionary=dictionary.cpu().eval(), final_metrics=metrics, steps=steps)
