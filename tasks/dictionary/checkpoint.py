"""Training checkpoints: every tensor in safetensors, everything else in JSON; never pickle.

One checkpoint is a folder `step-<N>/` holding `dictionary.safetensors` (parameters and every buffer, the
non-persistent ones such as `input_scale` and GBA's firing counts included), `optimizer.safetensors` (AdamW's
moments and step counts), `trainer.safetensors` (the dead-latent counters) and `state.json` (step, the
optimizer's param groups, the first and last metrics, plain-Python counters). `state.json` is written last and
fsynced, so a folder with one is complete; a kill while writing leaves a folder without it, which `latest`
ignores and the next save removes. Only the newest complete checkpoint is kept.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from featureatlas.tasks.dictionary.base import Dictionary

logger = logging.getLogger(__name__)

STATE_NAME = "state.json"
CHECKPOINT_VERSION = 1
# Plain-Python training counters some methods keep outside their tensors (LinearSAE's L1 warm-up clock).
COUNTERS = ("steps_taken",)


class Checkpoint(NamedTuple):
    step: int
    folder: Path


def _fsync_save(tensors: dict[str, Tensor], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp))
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _module_tensors(dictionary: Dictionary) -> dict[str, Tensor]:
    return dict(dictionary.named_parameters()) | dict(dictionary.named_buffers())


def save_checkpoint(
    root: Path,
    step: int,
    dictionary: Dictionary,
    optimizer: torch.optim.Optimizer,
    trainer_tensors: dict[str, Tensor],
    state: dict[str, Any],
) -> Path:
    """Write checkpoint `step` under `root`, then delete every older or incomplete one."""
    folder = root / f"step-{step:09d}"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    _fsync_save(_module_tensors(dictionary), folder / "dictionary.safetensors")
    opt = optimizer.state_dict()
    opt_tensors = {
        f"{index}.{name}": value
        for index, slots in opt["state"].items()
        for name, value in slots.items()
        if isinstance(value, Tensor)
    }
    _fsync_save(opt_tensors, folder / "optimizer.safetensors")
    _fsync_save(trainer_tensors, folder / "trainer.safetensors")
    counters = {name: getattr(dictionary, name) for name in COUNTERS if hasattr(dictionary, name)}
    payload = {
        "version": CHECKPOINT_VERSION,
        "step": step,
        "method": dictionary.method,
        "d_in": dictionary.d_in,
        "d_sae": dictionary.d_sae,
        "param_groups": opt["param_groups"],
        "counters": counters,
        **state,
    }
    tmp = folder / f".{STATE_NAME}.tmp"
    with tmp.open("w") as f:
        json.dump(payload, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / STATE_NAME)
    for other in root.iterdir():
        if other != folder and other.name.startswith("step-"):
            shutil.rmtree(other)
    return folder


def latest(root: Path | None) -> Checkpoint | None:
    """The newest complete checkpoint under `root`, if any."""
    if root is None or not root.is_dir():
        return None
    done = sorted(p for p in root.iterdir() if p.name.startswith("step-") and (p / STATE_NAME).is_file())
    if not done:
        return None
    return Checkpoint(int(done[-1].name.removeprefix("step-")), done[-1])


def load_checkpoint(
    ckpt: Checkpoint, dictionary: Dictionary, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Restore `dictionary` and `optimizer` in place; return (trainer tensors, state.json)."""
    state = json.loads((ckpt.folder / STATE_NAME).read_text())
    mine = (dictionary.method, dictionary.d_in, dictionary.d_sae)
    theirs = (state["method"], state["d_in"], state["d_sae"])
    if mine != theirs:
        raise ValueError(
            f"checkpoint {ckpt.folder} holds (method, d_in, d_sae) = {theirs}, but this run trains {mine} "
            "on activations of that d_in; delete the checkpoint folder to start afresh"
        )
    saved = load_file(str(ckpt.folder / "dictionary.safetensors"))
    with torch.no_grad():
        for name, tensor in _module_tensors(dictionary).items():
            tensor.copy_(saved[name])
    for name, value in state["counters"].items():
        setattr(dictionary, name, value)
    flat = load_file(str(ckpt.folder / "optimizer.safetensors"))
    slots: dict[int, dict[str, Tensor]] = {}
    for key, value in flat.items():
        index, name = key.split(".", 1)
        slots.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": slots, "param_groups": state["param_groups"]})
    return load_file(str(ckpt.folder / "trainer.safetensors")), state
