"""Triton kernels for the TopK family's sparse training path, and the switch that decides when they run.

The sparse path (tasks.dictionary.sparse_decoder) works on the `nnz = batch * k` selected (token, latent)
entries. Its torch operations move more memory than the work needs: `embedding_bag`'s backward zeroes a dense
[d_sae, d_in] gradient, sorts, then gathers every selected decoder row a second time for the code gradients;
the encoder gradient gathers the inputs per latent into a [d_sae, d_in] buffer and transposes it. The kernels
(`triton_sparse`) do each of these in one pass, sorted by latent, writing every gradient row or column once:

- `bag_sum`: out[b] = sum of weights[e] * table[index[e]] over the entries e of bag b (the decode), with a
  backward that reads each selected table row once for the code gradients and builds the table gradient
  without a dense intermediate;
- `select_pre`: `SelectedPre` with the W_enc gradient written column-tile by column-tile in W_enc's own
  [d_in, d_sae] layout, and b_enc's gradient from the same pass.

All sums run in float32 whatever the storage dtype, so the results equal the torch path's up to summation
order. Which path runs is set by `FEATUREATLAS_SPARSE_KERNELS` (or `sparse_kernels(...)` in code):
"off" (the default) never uses them, "auto" uses them on CUDA when Triton imports, "on" always (on CPU
tensors only under the Triton interpreter, TRITON_INTERPRET=1, which the tests use). They are opt-in: they
equal the torch path in the tests (Triton's interpreter, and compiled for sm_90), but become the default
only once `benchmarks/gpu/run_checks.sh` has measured them correct and faster on a GPU. Nothing here imports
Triton until a kernel is first called, so CPU-only installs never need it.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

import torch
from torch import Tensor

MODE_ENV = "FEATUREATLAS_SPARSE_KERNELS"
MODES = ("auto", "on", "off")
# Set by `sparse_kernels`; None defers to the environment variable.
_override: str | None = None


def kernels_mode() -> str:
    """The current setting: `sparse_kernels`' if inside one, else $FEATUREATLAS_SPARSE_KERNELS, else off."""
    mode = _override or os.environ.get(MODE_ENV, "off")
    if mode not in MODES:
        raise ValueError(f"{MODE_ENV}={mode!r} is not a mode; choose one of {', '.join(MODES)}")
    return mode


@contextmanager
def sparse_kernels(mode: str) -> Iterator[None]:
    """Run the enclosed code with kernels `mode` ("auto", "on" or "off"), then restore the previous one."""
    global _override
    if mode not in MODES:
        raise ValueError(f"kernel mode {mode!r}; choose one of {', '.join(MODES)}")
    previous, _override = _override, mode
    try:
        yield
    finally:
        _override = previous


@cache
def triton_available() -> bool:
    """Whether Triton can be imported (CUDA builds of torch ship it; CPU builds do not)."""
    return importlib.util.find_spec("triton") is not None


def use_kernels(device: torch.device) -> bool:
    """Whether the sparse path on `device` should run the Triton kernels under the current mode."""
    mode = kernels_mode()
    if mode == "off":
        return False
    if mode == "auto":
        return device.type == "cuda" and triton_available()
    if not triton_available():
        raise RuntimeError(f"{MODE_ENV}=on needs Triton (pip install triton); or set it to auto")
    return True


def bag_sum(index: Tensor, table: Tensor, weights: Tensor, offsets: Tensor) -> Tensor:
    """`sparse_decoder.bag_sum` through the kernels: out [n_bags, table.shape[1]], bags starting at
    `offsets` [n_bags] (entries sorted by bag), differentiable in `table` and `weights`."""
    from featureatlas.tasks.dictionary.kernels.autograd import GatherSum

    ptr = torch.cat([offsets, offsets.new_full((1,), index.numel())])
    return GatherSum.apply(index, table, weights, ptr)


def select_pre(
    x: Tensor, b_dec: Tensor, W_enc: Tensor, b_enc: Tensor, rows: Tensor, cols: Tensor, values: Tensor
) -> Tensor:
    """`sparse_decoder.SelectedPre.apply` with its W_enc and b_enc gradients from a Triton kernel."""
    from featureatlas.tasks.dictionary.kernels.autograd import SelectedPreKernel

    return SelectedPreKernel.apply(x, b_dec, W_enc, b_enc, rows, cols, values)
