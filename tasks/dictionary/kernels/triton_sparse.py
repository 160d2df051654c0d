"""The Triton kernels of the sparse path and their launchers (plain tensor in, tensor out; no autograd).

Entries are (bag, latent, weight) triples: bag = token (or Matryoshka's (block, token) bag), latent = the
selected row of a [d_sae, D] table (W_dec) or column of a [D, d_sae] one (W_enc). Three kernels:

- `gather_sum`: one program per (bag, block of D), summing its entries' weighted table rows. The rows are
  gathered from memory (each selected row about nnz / d_sae times); the output is written once.
- `scatter_rows` (decode backward): entries sorted by latent, one program per (group of latents, block of
  D). For each latent it reads its table row once and, for each of its entries, the output gradient's row of
  the entry's bag (a [batch, D] tensor, small enough to stay in the GPU's L2 cache); it accumulates the
  latent's table-gradient row and each entry's partial dot product (the weight gradient). Every gradient row
  is written exactly once, zeros for latents nobody selected, so no dense zero-fill, no atomics, and the
  result does not depend on scheduling. Partial dots land in [n_blocks_of_D, nnz] and are summed after.
- `scatter_cols` (encoder backward): the same per-latent accumulation of source rows (the centred inputs),
  but the result is a column of W_enc [D, d_sae]. A program owns LATENTS adjacent columns and builds a
  [BLOCK_D, LATENTS] tile, so its stores are contiguous runs along d_sae instead of one element per row;
  it also sums the entries' weights per latent (the b_enc gradient).

Accumulation is float32; values are stored in the output's dtype. Block sizes are fixed, not autotuned:
BLOCK_D 256 keeps a row chunk at 1 KiB in float32 (coalesced, 4 elements per thread at 2 warps).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_D = 256
ROW_LATENTS = 8  # latents per `scatter_rows` program: fewer, larger programs than one per latent
COL_LATENTS = 32  # columns per `scatter_cols` tile: 128 contiguous bytes of float32 per stored row
COL_BLOCK_D = 64


@triton.jit
def _gather_sum_kernel(
    out_ptr, table_ptr, index_ptr, weight_ptr, ptr_ptr, D, s_t0, s_t1, s_o0, BLOCK: tl.constexpr
):
    bag = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    d_mask = d < D
    start = tl.load(ptr_ptr + bag)
    end = tl.load(ptr_ptr + bag + 1)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for e in range(start, end):
        row = tl.load(index_ptr + e).to(tl.int64)
        w = tl.load(weight_ptr + e).to(tl.float32)
        acc += w * tl.load(table_ptr + row * s_t0 + d * s_t1, mask=d_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + bag * s_o0 + d, acc.to(out_ptr.dtype.element_ty), mask=d_mask)


@triton.jit
def _scatter_rows_kernel(
    grad_table_ptr, part_ptr, grad_ptr, table_ptr, bag_ptr, weight_ptr, pos_ptr, latent_ptr,
    n_latents, nnz, D, s_g0, s_g1, s_t0, s_t1, s_gt0,
    LATENTS: tl.constexpr, BLOCK: tl.constexpr, WANT_TABLE: tl.constexpr, WANT_WEIGHTS: tl.constexpr,
):  # fmt: skip
    block = tl.program_id(1)
    d = block * BLOCK + tl.arange(0, BLOCK)
    d_mask = d < D
    for i in range(LATENTS):
        j = (tl.program_id(0) * LATENTS + i).to(tl.int64)
        # the last group's tail past n_latents: an empty D range masks its loads and stores
        live = d < tl.where(j < n_latents, D, 0)
        # latent_ptr is padded past n_latents with nnz, so the latents of the last group's tail are empty
        start = tl.load(latent_ptr + j)
        end = tl.load(latent_ptr + j + 1)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        if WANT_WEIGHTS:
            row = tl.load(table_ptr + j * s_t0 + d * s_t1, mask=live, other=0.0).to(tl.float32)
        for e in range(start, end):
            bag = tl.load(bag_ptr + e).to(tl.int64)
            g = tl.load(grad_ptr + bag * s_g0 + d * s_g1, mask=d_mask, other=0.0).to(tl.float32)
            if WANT_TABLE:
                acc += tl.load(weight_ptr + e).to(tl.float32) * g
            if WANT_WEIGHTS:
                pos = tl.load(pos_ptr + e).to(tl.int64)
                tl.store(part_ptr + block * nnz + pos, tl.sum(g * row))
        if WANT_TABLE:
            out = grad_table_ptr + j * s_gt0 + d
            tl.store(out, acc.to(grad_table_ptr.dtype.element_ty), mask=live)


@triton.jit
def _scatter_cols_kernel(
    grad_ptr, sums_ptr, src_ptr, row_ptr, weight_ptr, latent_ptr, n_latents, D, s_s0, s_s1, s_gr0,
    LATENTS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    first = tl.program_id(0) * LATENTS
    block = tl.program_id(1)
    d = block * BLOCK + tl.arange(0, BLOCK)
    d_mask = d < D
    lanes = tl.arange(0, LATENTS)
    tile = tl.zeros([BLOCK, LATENTS], dtype=tl.float32)
    sums = tl.zeros([LATENTS], dtype=tl.float32)
    for i in tl.static_range(LATENTS):
        start = tl.load(latent_ptr + first + i)
        end = tl.load(latent_ptr + first + i + 1)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        total = tl.zeros([1], dtype=tl.float32)
        for e in range(start, end):
            row = tl.load(row_ptr + e).to(tl.int64)
            w = tl.load(weight_ptr + e).to(tl.float32)
            acc += w * tl.load(src_ptr + row * s_s0 + d * s_s1, mask=d_mask, other=0.0).to(tl.float32)
            total += w
        # No register indexing in Triton: the latent's column joins the tile through a mask.
        tile += tl.where(lanes[None, :] == i, acc[:, None], 0.0)
        sums += tl.where(lanes == i, total, 0.0)
    cols = first + lanes
    col_mask = cols < n_latents
    out = grad_ptr + d[:, None].to(tl.int64) * s_gr0 + cols[None, :]
    tl.store(out, tile.to(grad_ptr.dtype.element_ty), mask=d_mask[:, None] & col_mask[None, :])
    if block == 0:
        tl.store(sums_ptr + cols, sums, mask=col_mask)


def _check_device(*tensors: Tensor) -> None:
    """Triton runs on CUDA tensors; CPU tensors only in its interpreter (the CPU tests)."""
    if any(t.device.type == "cpu" for t in tensors) and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "the Triton sparse kernels got CPU tensors; they run on CPU only under TRITON_INTERPRET=1 "
            "(the Triton interpreter); set FEATUREATLAS_SPARSE_KERNELS=auto to use torch on CPU"
        )


def latent_order(latents: Tensor, n_latents: int, group: int) -> tuple[Tensor, Tensor]:
    """(order, latent_ptr): entries sorted by latent (stable: ties keep their order, so sums are
    deterministic) and the start of each latent's run, padded with nnz up to a multiple of `group` + 1."""
    order = torch.argsort(latents, stable=True)
    n_padded = triton.cdiv(n_latents, group) * group
    bounds = torch.arange(n_padded + 1, device=latents.device, dtype=latents.dtype)
    return order, torch.searchsorted(latents[order], bounds)


def gather_sum(index: Tensor, table: Tensor, weights: Tensor, ptr: Tensor) -> Tensor:
    """out [n_bags, D] in table's dtype: out[b] = sum of weights[e] * table[index[e]] over e in
    [ptr[b], ptr[b+1])."""
    _check_device(index, table, weights, ptr)
    n_bags, D = ptr.numel() - 1, table.shape[1]
    out = torch.empty(n_bags, D, dtype=table.dtype, device=table.device)
    if n_bags == 0 or D == 0:
        return out
    grid = (n_bags, triton.cdiv(D, BLOCK_D))
    _gather_sum_kernel[grid](
        out, table, index.contiguous(), weights.contiguous(), ptr.contiguous(), D, *table.stride(),
        out.stride(0), BLOCK=BLOCK_D, num_warps=2,
    )  # fmt: skip
    return out


def scatter_rows(
    grad: Tensor,
    table: Tensor,
    index: Tensor,
    bags: Tensor,
    weights: Tensor,
    want_table: bool,
    want_weights: bool,
) -> tuple[Tensor | None, Tensor | None]:
    """The backward of `gather_sum` for the output gradient `grad` [n_bags, D]; `bags` [nnz] is each entry's
    bag. Returns (grad_table [d_sae, D] in table's dtype, grad_weights [nnz] float32), None where unwanted."""
    _check_device(grad, table, index, bags, weights)
    (n_latents, D), nnz = table.shape, index.numel()
    grad_table = torch.empty_like(table, memory_format=torch.contiguous_format) if want_table else None
    parts = None
    n_blocks = triton.cdiv(D, BLOCK_D)
    if want_weights:
        parts = torch.zeros(n_blocks, nnz, dtype=torch.float32, device=table.device)
    if n_latents == 0 or D == 0 or not (want_table or want_weights):
        return grad_table, None if parts is None else parts.sum(0)
    order, latent_ptr = latent_order(index, n_latents, ROW_LATENTS)
    grid = (triton.cdiv(n_latents, ROW_LATENTS), n_blocks)
    _scatter_rows_kernel[grid](
        grad_table if want_table else table, parts if want_weights else weights, grad, table,
        bags[order].contiguous(), weights[order].contiguous(), order, latent_ptr,
        n_latents, nnz, D, *grad.stride(), *table.stride(), D,
        LATENTS=ROW_LATENTS, BLOCK=BLOCK_D, WANT_TABLE=want_table, WANT_WEIGHTS=want_weights, num_warps=2,
    )  # fmt: skip
    return grad_table, None if parts is None else parts.sum(0)


def scatter_cols(
    src: Tensor, rows: Tensor, cols: Tensor, weights: Tensor, n_latents: int
) -> tuple[Tensor, Tensor]:
    """(grad [D, n_latents], sums [n_latents]), both float32: grad[:, j] = sum of weights[e] * src[rows[e]]
    and sums[j] = sum of weights[e], over the entries e with cols[e] = j; src [n_rows, D]."""
    _check_device(src, rows, cols, weights)
    D = src.shape[1]
    grad = torch.empty(D, n_latents, dtype=torch.float32, device=src.device)
    sums = torch.empty(n_latents, dtype=torch.float32, device=src.device)
    if n_latents == 0 or D == 0:
        return grad, sums
    order, latent_ptr = latent_order(cols, n_latents, COL_LATENTS)
    grid = (triton.cdiv(n_latents, COL_LATENTS), triton.cdiv(D, COL_BLOCK_D))
    _scatter_cols_kernel[grid](
        grad, sums, src, rows[order].contiguous(), weights[order].contiguous(), latent_ptr, n_latents, D,
        *src.stride(), grad.stride(0), LATENTS=COL_LATENTS, BLOCK=COL_BLOCK_D, num_warps=4,
    )  # fmt: skip
    return grad, sums
