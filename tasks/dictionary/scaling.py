"""Input scaling shared by methods: one scalar that brings the mean squared norm of the inputs to a target.

Sums run in float64 over row chunks: caches are large and often bfloat16, where a float32 running sum over
millions of rows loses the digits that matter.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor


class InputStats(NamedTuple):
    scale: float  # multiply raw acts by this to reach the target mean squared norm
    scaled_mean: Tensor  # [d_in] float64, the mean of acts * scale


@torch.no_grad()
def fit_input_scale(acts: Tensor, target_sq_norm: float, chunk_rows: int = 65_536) -> InputStats:
    """The scale with E||acts * scale||^2 = target_sq_norm, and the scaled mean, of acts [n, d_in]."""
    n, d_in = acts.shape
    total = torch.zeros(d_in, dtype=torch.float64)
    sum_sq = torch.zeros((), dtype=torch.float64)
    for start in range(0, n, chunk_rows):
        chunk = acts[start : start + chunk_rows].to("cpu", torch.float64)
        total += chunk.sum(0)
        sum_sq += chunk.pow(2).sum()
    if float(sum_sq) <= 0:
        raise ValueError("acts are all zero; input scaling needs activations with a nonzero norm")
    scale = math.sqrt(target_sq_norm * n / float(sum_sq))
    return InputStats(scale, total / n * scale)
