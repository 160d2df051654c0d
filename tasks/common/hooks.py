"""Hookpoints: find a site, read its activation, or replace it during a forward pass.

A hookpoint is the dotted name `model.named_modules()` gives a module, e.g. `model.layers.6` for the output
of the seventh decoder block (the residual stream after it), or an alias such as `mlp_hidden.6` that
`tasks.common.hookpoints` resolves per architecture (some aliases read a module's *input*, via a forward
pre-hook). Caching, evaluation and labeling all go through these helpers, so every stage reads the same tensor
for the same name.

Modules return either a Tensor or a tuple whose first element is the hidden state (transformers 4.x decoder
blocks), or a `ModelOutput`; `unwrap_output` / `rewrap_output` hide the difference.
"""

from __future__ import annotations

import copy
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from featureatlas.tasks.common.hookpoints import HINT as _HINT
from featureatlas.tasks.common.hookpoints import Site, resolve_site

__all__ = [
    "capture_activations",
    "resolve_hookpoint",
    "resolve_site",
    "rewrap_output",
    "splice",
    "unwrap_output",
]


_MODEL_LOCKS: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def model_lock(model: nn.Module) -> threading.RLock:
    """The lock that serialises hooked forward passes of `model`: hooks live on the shared module, so two
    threads capturing at once (a background shard reader and the main thread) would see each other's."""
    with _LOCKS_GUARD:
        lock = _MODEL_LOCKS.get(model)
        if lock is None:
            lock = _MODEL_LOCKS[model] = threading.RLock()
        return lock


class _StopForward(Exception):
    """Raised from a hook once every requested hookpoint has fired, to skip the rest of the model."""


def resolve_hookpoint(model: nn.Module, name: str) -> nn.Module:
    """The module a hookpoint (module name or alias) hooks; a ValueError with close matches if none."""
    return resolve_site(model, name).module


def _first_arg(site: Site, args: tuple) -> Tensor:
    if not args or not isinstance(args[0], Tensor):
        raise TypeError(
            f"hookpoint {site.name!r} reads the input of {site.module_name}, but that module was not called "
            "with a tensor as its first positional argument; hook its output or another module instead"
        )
    return args[0]


def _register(site: Site, fn: Callable[[Tensor], Tensor | None]) -> torch.utils.hooks.RemovableHandle:
    """Hook `site`: `fn` sees its activation; a tensor `fn` returns replaces the activation."""
    if site.read == "input":

        def pre_hook(_module: nn.Module, args: tuple) -> tuple | None:
            new = fn(_first_arg(site, args))
            return None if new is None else (new, *args[1:])

        return site.module.register_forward_pre_hook(pre_hook)

    def hook(_module: nn.Module, _args: Any, output: Any) -> Any:
        new = fn(unwrap_output(output))
        return None if new is None else rewrap_output(output, new)

    return site.module.register_forward_hook(hook)


def unwrap_output(output: Any) -> Tensor:
    """The hidden-state tensor inside a module's output: the output itself, or its first element."""
    if isinstance(output, Tensor):
        return output
    if hasattr(output, "to_tuple"):  # a transformers ModelOutput
        output = output.to_tuple()
    first = output[0] if isinstance(output, (tuple, list)) and output else None
    if not isinstance(first, Tensor):
        raise TypeError(
            f"cannot read a hidden state from a module output of type {type(output).__name__}; "
            f"pick a hookpoint whose module returns a Tensor or a tuple starting with one ({_HINT})"
        )
    return first


def rewrap_output(output: Any, new: Tensor) -> Any:
    """The inverse of `unwrap_output`: `output` with its hidden-state tensor replaced by `new`."""
    if isinstance(output, Tensor):
        return new
    if isinstance(output, tuple):
        return (new, *output[1:])
    if isinstance(output, list):
        return [new, *output[1:]]
    if hasattr(output, "to_tuple"):
        # ModelOutput: a shallow copy keeps the other fields; its __setitem__ also updates the attribute.
        replaced = copy.copy(output)
        replaced[next(iter(output.keys()))] = new
        return replaced
    raise TypeError(f"cannot replace the hidden state in a module output of type {type(output).__name__}")


@torch.no_grad()
def capture_activations(
    model: nn.Module,
    hookpoints: list[str],
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    stop_early: bool = True,
) -> dict[str, Tensor]:
    """Run `model` on `input_ids [batch, seq]` and return each hookpoint's output `[batch, seq, d]`, detached.

    With `stop_early`, the forward pass ends as soon as the last requested hookpoint has fired, so later
    layers (and the large `lm_head`) never run: caching layer 6 of a 24-layer model costs a quarter of a pass.
    A hookpoint whose module runs more than once in a pass is refused, since its activation is ambiguous
    (with `stop_early` and that hookpoint last, the pass ends at its first call, which is returned).
    """
    if not hookpoints:
        raise ValueError("capture_activations needs at least one hookpoint, e.g. ['model.layers.0']")
    sites = {name: resolve_site(model, name) for name in hookpoints}
    captured: dict[str, Tensor] = {}

    def make_hook(name: str) -> Callable[[Tensor], None]:
        def hook(act: Tensor) -> None:
            if name in captured:
                raise ValueError(
                    f"hookpoint {name!r} ran twice in one forward pass, so its activation is ambiguous; "
                    f"pick a module that runs once per pass ({_HINT})"
                )
            # clone: a later layer may update the same storage in place before we return it.
            captured[name] = act.detach().clone()
            if stop_early and len(captured) == len(sites):
                raise _StopForward

        return hook

    with model_lock(model):
        handles = [_register(site, make_hook(name)) for name, site in sites.items()]
        try:
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()

    missing = [name for name in hookpoints if name not in captured]
    if missing:
        raise ValueError(
            f"hookpoints {missing} never ran during the forward pass; "
            f"pick modules on the forward path ({_HINT})"
        )
    return {name: captured[name] for name in hookpoints}


@contextmanager
def splice(model: nn.Module, hookpoint: str, fn: Callable[[Tensor], Tensor]) -> Iterator[nn.Module]:
    """Within the block, replace `hookpoint`'s activation `x` by `fn(x)`, keeping any tuple around it.

    For a site read from a module's input (`mlp_hidden.L`, `attn_z.L`) the input is replaced before the module
    runs. Yields the hooked module. The hook is removed on leaving the block, also when the block raises.
    """
    site = resolve_site(model, hookpoint)
    handle = _register(site, fn)
    try:
        yield site.module
    finally:
        handle.remove()
