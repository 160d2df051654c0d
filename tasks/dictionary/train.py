"""Train gradient-based dictionaries on activations: seeded, minibatched AdamW with live metrics.

The loop is method-agnostic. A method supplies its losses and its constraints through the `Trainable` hooks
(`init_from_data`, `training_loss`, `before_optimizer_step`, `after_optimizer_step`, and optionally
`after_step(step)` for updates outside the gradient, such as bias adaptation); this module owns the
data order, the device, the optimizer and its learning-rate schedule (linear warm-up, constant, linear
decay), dead-latent bookkeeping, the check that the loss stays finite and bounded, checkpoints, and the
metrics handed to `on_metrics` (MLflow in the flow).

Data comes from an `ActivationSource` (`tasks.dictionary.data`): a tensor in memory, or a cache streamed shard
by shard. `train_dictionaries` trains several dictionaries (a sweep) from one pass: each batch is read once
and fed to every one of them. A dictionary's batches depend only on (seed, batch_size), so one trained in a
sweep equals the same one trained alone, and one resumed from a checkpoint equals an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from featureatlas.schemas.methods import DictionaryConfig
from featureatlas.tasks.dictionary import checkpoint as ckpt
from featureatlas.tasks.dictionary.base import Dictionary, TrainStepOutput
from featureatlas.tasks.dictionary.data import ActivationSource, TensorSource, batches, validate_acts
from featureatlas.tasks.dictionary.paired import PairedSource
from featureatlas.tasks.dictionary.registry import METHODS, build_dictionary

__all__ = ["TrainResult", "resolve_device", "train_dictionaries", "train_dictionary", "validate_acts"]

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


# An automatic warm-up (`warmup_steps: null`) lasts this share of the run, at most AUTO_WARMUP_MAX steps:
# Gao et al. and dictionary_learning warm up over 1000 steps, which a short run must not spend whole.
AUTO_WARMUP_FRACTION = 0.05
AUTO_WARMUP_MAX = 1000


def warmup_for(warmup_steps: int | None, steps: int) -> int:
    """Warm-up steps of a run of `steps`: as given, or min(AUTO_WARMUP_MAX, AUTO_WARMUP_FRACTION x steps)."""
    if warmup_steps is not None:
        return warmup_steps
    return min(AUTO_WARMUP_MAX, int(AUTO_WARMUP_FRACTION * steps))


def lr_factor(step: int, steps: int, warmup_steps: int | None, decay_fraction: float) -> float:
    """Multiplier of the peak lr at optimizer step `step` (1-based): warm-up, flat, decay to 0."""
    warmup_steps = warmup_for(warmup_steps, steps)
    factor = 1.0
    if warmup_steps > 0:
        factor = min(factor, step / warmup_steps)
    decay_steps = int(decay_fraction * steps)
    if decay_steps > 0:
        factor = min(factor, (steps - step + 1) / decay_steps)
    return factor


@contextlib.contextmanager
def matmul_precision(device: torch.device, tf32: bool):
    """float32 matmuls on CUDA in TF32 (`tf32`, the default) for the steps inside; restored afterwards.

    TF32 keeps float32's range with a 10-bit mantissa: on Hopper about 8x the plain float32 matmul rate, and
    the loss and gradients stay within ~1e-3 relative. Set `tf32: false` for bit-faithful float32. CPU
    matmuls are left as they are.
    """
    if device.type != "cuda":
        yield
        return
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


# A loss this many times above the first step's means the run has diverged; no sane schedule climbs so far.
DIVERGENCE_FACTOR = 1e3


def check_loss(loss: float, step: int, first_loss: float | None, name: str = "") -> None:
    """Stop with the step named when the loss is NaN/inf or exploded past DIVERGENCE_FACTOR x its start."""
    who = f"{name}: " if name else ""
    if not math.isfinite(loss):
        raise FloatingPointError(
            f"{who}loss became {loss} at step {step}; lower the learning rate (lr) or add warmup_steps"
        )
    if first_loss is not None and loss > DIVERGENCE_FACTOR * max(first_loss, 1e-6):
        raise FloatingPointError(
            f"{who}loss diverged at step {step}: {loss:.3g}, over {DIVERGENCE_FACTOR:g}x the first step's "
            f"{first_loss:.3g}; lower the learning rate (lr) or add warmup_steps"
        )


def own_fit(cfg: DictionaryConfig) -> Callable | None:
    """The `fit` of a method that is not gradient-trained (semi-NMF), which then trains on its own."""
    return getattr(METHODS.get(cfg.method), "fit", None)


def sweep_key(cfg: DictionaryConfig) -> tuple:
    """Dictionaries with equal keys can share one pass over the data: they read the same batches."""
    if own_fit(cfg) is not None:
        return ("own_fit", id(cfg))
    if cfg.nproc_per_node > 1:  # trains alone, in its own torchrun launch (tasks.dictionary.launch)
        return ("data_parallel", id(cfg))
    if cfg.target_hookpoint is not None:  # a transcoder's batches also carry its target's activations
        return (cfg.batch_size, cfg.seed, cfg.device, cfg.target_hookpoint)
    return (cfg.batch_size, cfg.seed, cfg.device)


class _Member:
    """One dictionary of a (possibly one-member) sweep: its model, optimizer, counters and checkpoints."""

    def __init__(
        self,
        cfg: DictionaryConfig,
        d_in: int,
        n_rows: int,
        device: torch.device,
        on_metrics: MetricsCallback | None,
        checkpoint_dir: Path | None,
        split: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None,
    ) -> None:
        self.cfg, self.device, self.on_metrics, self.checkpoint_dir = cfg, device, on_metrics, checkpoint_dir
        # A transcoder's batches are [inputs | targets] (tasks.dictionary.paired); `split` parts them.
        if (split is None) != (cfg.target_hookpoint is None):
            raise ValueError(
                f"{cfg.method}: a transcoder (target_hookpoint set) trains on paired input and target "
                "activations (pass targets=...), and only a transcoder does"
            )
        self.split = split
        self.name = f"{cfg.method} (d_sae={cfg.d_sae})"
        self.batch_size = min(cfg.batch_size, n_rows)
        self.steps = cfg.steps or cfg.epochs * math.ceil(n_rows / self.batch_size)
        # Methods without a dead-latent threshold count a latent dead after a whole pass without firing.
        self.dead_tokens = getattr(cfg, "dead_tokens", n_rows)
        self.dictionary = build_dictionary(cfg, d_in)
        if not isinstance(self.dictionary, Trainable):
            raise TypeError(f"method {cfg.method!r} lacks the Trainable hooks that train_dictionary needs")
        self.found = ckpt.latest(checkpoint_dir)
        self.start, self.first_loss, self.metrics = 0, None, {}
        self.tokens_since_fired = torch.zeros(self.dictionary.d_sae, dtype=torch.long, device=device)
        # A host-side upper bound on max(tokens_since_fired), refreshed where metrics are read back anyway:
        # while it stays below dead_tokens no latent can be dead, and the step skips the AuxK selection
        # without asking the device.
        self.since_fired_bound = 0

    def prepare(self, sample: Tensor | None) -> None:
        """Initialise from the data sample (or restore the checkpoint), move to the device, build AdamW."""
        if self.found is None:
            assert sample is not None  # the caller reads a sample whenever some member starts afresh
            if self.split is None:
                self.dictionary.init_from_data(sample)
            else:
                self.dictionary.init_from_data(*self.split(sample))
        self.dictionary.to(self.device).train()
        # Optional hook, run after each complete step (1-based), e.g. GBA's every-T-steps bias update.
        self.after_step = getattr(self.dictionary, "after_step", None)
        # Frozen parameters (a bias-free method's zero biases) stay out of the optimizer and its weight decay.
        params = [p for p in self.dictionary.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        if self.found is not None:
            tensors, state = ckpt.load_checkpoint(self.found, self.dictionary, self.optimizer)
            self.tokens_since_fired.copy_(tensors["tokens_since_fired"])
            self.since_fired_bound = int(self.tokens_since_fired.max())
            self.start, self.first_loss, self.metrics = self.found.step, state["first_loss"], state["metrics"]
            logger.info("%s: resuming from the checkpoint of step %d", self.name, self.start)
        self.loss_fn = self.dictionary.training_loss
        if self.cfg.compile:
            self.loss_fn = torch.compile(self.loss_fn)
        if self.cfg.autocast == "bf16":
            self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16)
        else:
            self.autocast = contextlib.nullcontext()

    def active(self, step: int) -> bool:
        return self.start < step <= self.steps

    def train_step(self, batch: Tensor, step: int) -> None:
        with matmul_precision(self.device, self.cfg.tf32):
            self._train_step(batch, step)

    def _train_step(self, batch: Tensor, step: int) -> None:
        cfg, dictionary = self.cfg, self.dictionary
        with self.autocast:
            # None: no latent can be dead yet (see since_fired_bound), known without a device sync. A
            # compiled loss always gets the mask (all False early on, which AuxK turns into 0): one graph
            # for every step, and the graph traced for None lost the loss's autograd history under inductor.
            dead = None
            if self.since_fired_bound >= self.dead_tokens or cfg.compile:
                dead = self.tokens_since_fired >= self.dead_tokens
            if self.split is None:
                out = self.loss_fn(batch, dead)
            else:
                acts, target = self.split(batch)
                out = self.loss_fn(acts, dead, target)
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        dictionary.before_optimizer_step()
        lr = cfg.lr * lr_factor(step, self.steps, cfg.warmup_steps, cfg.decay_fraction)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        dictionary.after_optimizer_step()
        if self.after_step is not None:
            self.after_step(step)

        # masked_fill_, not boolean indexing: indexing by a mask reads its count back from the device.
        # `active` is the one definition of firing (evaluation and labeling use it too).
        fired = dictionary.active(out.codes)  # [batch, d_sae]
        self.tokens_since_fired.add_(batch.shape[0]).masked_fill_(fired.any(0), 0)
        self.since_fired_bound += batch.shape[0]
        # Metrics are read back only when logged: each .item() waits for the GPU.
        if step == 1:
            self.first_loss = out.loss.item()
            check_loss(self.first_loss, step, None, self.name)
        if step % cfg.log_every == 0 or step == self.steps:
            check_loss(out.loss.item(), step, self.first_loss, self.name)
            self.since_fired_bound = int(self.tokens_since_fired.max())
            self.metrics = {
                "loss": out.loss.item(),
                "mse": out.mse.item(),
                "fvu": out.fvu.item(),
                "l0": fired.sum(-1).float().mean().item(),
                "dead_fraction": (self.tokens_since_fired >= self.dead_tokens).float().mean().item(),
                "auxk_loss": out.auxk_loss.item(),
                "lr": lr,
            }
            if self.on_metrics is not None:
                self.on_metrics(self.metrics, step)
        if self.checkpoint_dir is not None and step % cfg.checkpoint_every == 0 and step < self.steps:
            self.save_checkpoint(out.loss.item(), step)

    def save_checkpoint(self, loss: float, step: int) -> None:
        # Only a good state is kept: a run that diverges stops here, leaving the previous checkpoint.
        check_loss(loss, step, self.first_loss, self.name)
        for name, p in self.dictionary.named_parameters():
            if not bool(torch.isfinite(p).all()):
                raise FloatingPointError(
                    f"{self.name}: parameter {name} is not finite at step {step}; lower the learning rate "
                    "(lr) or add warmup_steps"
                )
        ckpt.save_checkpoint(
            self.checkpoint_dir,
            step,
            self.dictionary,
            self.optimizer,
            {"tokens_since_fired": self.tokens_since_fired},
            {"first_loss": self.first_loss, "metrics": self.metrics},
        )

    def result(self) -> TrainResult:
        return TrainResult(
            dictionary=self.dictionary.cpu().eval(), final_metrics=self.metrics, steps=self.steps
        )


def train_dictionaries(
    cfgs: Sequence[DictionaryConfig],
    data: Tensor | ActivationSource,
    *,
    on_metrics: Sequence[MetricsCallback | None] | None = None,
    checkpoint_dirs: Sequence[Path | None] | None = None,
    progress: bool = False,
    targets: Tensor | None = None,
) -> list[TrainResult]:
    """Train every dictionary of `cfgs` from one pass over `data`; results in the order of `cfgs`.

    `data` is acts [n, d_in] (CPU, any float dtype; it stays there) or an `ActivationSource`. The configs must
    share `sweep_key` (batch_size, seed, device): they then read the same batches, each batch once. Steps per
    dictionary: `cfg.steps`, else `cfg.epochs` x ceil(n / batch_size). Every `cfg.log_every` steps and at the
    last one, its `on_metrics(metrics, step)` gets loss, mse (raw units), fvu, l0, dead_fraction, auxk_loss
    and lr. NaN, inf or a loss past DIVERGENCE_FACTOR x the first raise FloatingPointError naming the step.
    With a `checkpoint_dirs` entry, a dictionary saves a checkpoint there every `cfg.checkpoint_every` steps
    and, when one is already there, resumes from it.
    Transcoders (`target_hookpoint` set) take their targets as `targets` [n, d_in] (rows aligned with an
    acts tensor) or as a `PairedSource` `data`.
    """
    source = TensorSource(data) if isinstance(data, Tensor) else data
    if targets is not None:
        source = PairedSource(source, TensorSource(targets))
    split = source.split if isinstance(source, PairedSource) else None
    d_in = source.d_input if split is not None else source.d_in
    n = len(cfgs)
    callbacks = list(on_metrics) if on_metrics is not None else [None] * n
    dirs = list(checkpoint_dirs) if checkpoint_dirs is not None else [None] * n
    if not (n and len(callbacks) == n and len(dirs) == n):
        raise ValueError(f"got {n} configs, {len(callbacks)} callbacks, {len(dirs)} checkpoint folders")
    if n == 1 and (fit := own_fit(cfgs[0])) is not None:
        return [fit(cfgs[0], source.materialize(), on_metrics=callbacks[0], progress=progress)]
    keys = {sweep_key(cfg) for cfg in cfgs}
    if len(keys) > 1:
        raise ValueError(
            f"dictionaries trained in one pass must share batch_size, seed and device (and be gradient-"
            f"trained); got {sorted(map(str, keys))}: train them in separate calls"
        )
    device = resolve_device(cfgs[0].device)
    members = [
        _Member(c, d_in, source.n_rows, device, cb, d, split) for c, cb, d in zip(cfgs, callbacks, dirs)
    ]
    fresh = any(m.found is None for m in members)
    sample = source.init_sample() if fresh else None
    for m in members:
        m.prepare(sample)
    del sample
    batch_size = members[0].batch_size
    start, total = min(m.start for m in members), max(m.steps for m in members)
    logger.info(
        "training %s: n=%d d_in=%d batch=%d steps %d..%d on %s",
        ", ".join(m.name for m in members),
        source.n_rows,
        d_in,
        batch_size,
        start + 1,
        total,
        device,
    )
    bar = tqdm(range(start + 1, total + 1), desc=f"train {members[0].name}", disable=not progress)
    # closed on the way out, also on an error: a source's background reader stops with it
    with contextlib.closing(batches(source, batch_size, cfgs[0].seed, start, stop=total)) as feed:
        for step in bar:
            batch = next(feed).to(device, non_blocking=True)
            for m in members:
                if m.active(step):
                    m.train_step(batch, step)
            if progress and members[0].metrics:
                bar.set_postfix(fvu=f"{members[0].metrics['fvu']:.4f}", l0=f"{members[0].metrics['l0']:.1f}")
    for m in members:
        logger.info("trained %s in %d steps: %s", m.name, m.steps, m.metrics)
    return [m.result() for m in members]


def train_dictionary(
    cfg: DictionaryConfig,
    data: Tensor | ActivationSource,
    *,
    on_metrics: MetricsCallback | None = None,
    checkpoint_dir: Path | None = None,
    progress: bool = False,
    targets: Tensor | None = None,
) -> TrainResult:
    """Train the one dictionary `cfg` describes; see `train_dictionaries`."""
    return train_dictionaries(
        [cfg],
        data,
        on_metrics=[on_metrics],
        checkpoint_dirs=[checkpoint_dir],
        progress=progress,
        targets=targets,
    )[0]
