"""The sparse training path of the TopK family: past the encoder matmul, only the selected latents cost.

A TopK step densely needs about six [batch, d_in] x [d_in, d_sae] matmuls: encode, decode, and two each in
their backward passes. But the codes have only k nonzeros per token, so everything after the encoder's
forward matmul can work on the `nnz = batch * k` selected (token, latent) pairs alone:

- decode gathers the k selected decoder rows per token (`embedding_bag`, mode "sum", the codes as
  per-sample weights), and its backward scatters into just those rows;
- the encoder's gradient is nonzero only at the selected pre-activations, so `SelectedPre` builds the
  W_enc gradient from the nnz entries (again with `embedding_bag`), b_enc's as their sums and b_dec's as one
  matrix-vector product, instead of two dense matmuls against a mostly-zero [batch, d_sae] gradient. The
  result is a dense tensor (AdamW wants one) whose unselected columns are zero.

The encoder's forward matmul stays dense (the selection needs every pre-activation), and so does the dense
[batch, d_sae] pre-activation tensor, but it is no longer kept for the backward pass: its buffer is reused
for the codes the trainer counts. The results equal the
dense path's up to float rounding (tests/dictionary/test_sparse_decoder.py checks outputs and gradients).
The gradients handed to the optimizer are ordinary dense tensors, so AdamW, the decoder-row constraint
(parallel gradient removed, rows renormalised) and checkpoints see no difference.

On CUDA with Triton, `bag_sum` and `select_codes` run the Triton kernels of tasks.dictionary.kernels
instead (same results; `FEATUREATLAS_SPARSE_KERNELS=off` keeps the torch operations); on CPU nothing changes.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from torch.nn import functional as F

from featureatlas.tasks.dictionary import kernels


class SparseCodes(NamedTuple):
    """Codes held as (token, latent, value) triples, sorted by token: the nonzero pattern of [n_rows, d_sae].

    Entries may carry a value of 0 (a selected latent whose pre-activation was negative); they cost a little
    work and contribute nothing.
    """

    rows: Tensor  # [nnz] long, token index, non-decreasing
    cols: Tensor  # [nnz] long, latent index
    values: Tensor  # [nnz], differentiable
    n_rows: int
    d_sae: int

    def dense(self) -> Tensor:
        """The codes as a dense [n_rows, d_sae] tensor (differentiable through `values`)."""
        out = self.values.new_zeros(self.n_rows, self.d_sae)
        return out.index_put((self.rows, self.cols), self.values, accumulate=True)

    def restrict(self, start: int, end: int) -> SparseCodes:
        """Only the entries of latents start <= col < end (order kept, so still sorted by token)."""
        keep = (self.cols >= start) & (self.cols < end)
        return SparseCodes(self.rows[keep], self.cols[keep], self.values[keep], self.n_rows, self.d_sae)


def row_offsets(rows: Tensor, n_rows: int) -> Tensor:
    """Start of each token's run in `rows` (sorted), as `embedding_bag` wants; empty runs allowed.

    A binary search rather than counts: `bincount` on CUDA reads its input's maximum back to the host, a sync
    in every step.
    """
    return torch.searchsorted(rows, torch.arange(n_rows, device=rows.device, dtype=rows.dtype))


def bag_sum(index: Tensor, table: Tensor, weights: Tensor, offsets: Tensor) -> Tensor:
    """out[b] = sum over entries i in bag b of weights[i] * table[index[i]]; out [n_bags, table.shape[1]]."""
    if kernels.use_kernels(table.device):
        return kernels.bag_sum(index, table, weights.to(table.dtype), offsets)
    return F.embedding_bag(index, table, offsets, mode="sum", per_sample_weights=weights.to(table.dtype))


class SelectedPre(torch.autograd.Function):
    """pre[rows, cols] of pre = (x - b_dec) @ W_enc + b_enc, with a backward that touches only those entries.

    `values` are the already computed pre-activations at the entries (taken from the dense forward matmul
    under no_grad); the forward pass only hands them on, the backward pass does the work, with
    x_c = x - b_dec and g the incoming gradient of the entries:
    grad_W_enc[:, j] = sum_i g_i x_c[rows_i] over entries with cols_i = j; grad_b_enc[j] = sum of those g_i;
    grad_b_dec = -W_enc @ grad_b_enc (a matrix-vector product: every token's x_c shares b_dec);
    grad_x[b] = sum_i g_i W_enc[:, cols_i] over the entries of token b (only if x requires grad).
    """

    @staticmethod
    def forward(ctx, x, b_dec, W_enc, b_enc, rows, cols, values):
        del b_enc  # an input only so that autograd hands its gradient to `backward`
        x_c = x.to(W_enc.dtype) - b_dec.detach()
        ctx.save_for_backward(x_c, W_enc, rows, cols)
        ctx.x_dtype = x.dtype
        return values.clone()

    @staticmethod
    def backward(ctx, grad):
        x_c, W_enc, rows, cols = ctx.saved_tensors
        d_sae = W_enc.shape[1]
        need_x, need_b_dec, need_W, need_b_enc = ctx.needs_input_grad[:4]
        grad = grad.to(W_enc.dtype)
        grad_x = grad_b_dec = grad_W = grad_b_enc = None
        sums = torch.zeros(d_sae, dtype=W_enc.dtype, device=W_enc.device).index_add_(0, cols, grad)
        if need_b_enc:
            grad_b_enc = sums
        if need_b_dec:
            grad_b_dec = -(W_enc @ sums)
        if need_W:
            # Entries regrouped by latent: each latent's bag sums g_i * x_c[token_i] into W_enc^T's row.
            order = torch.argsort(cols, stable=True)
            by_latent = bag_sum(rows[order], x_c, grad[order], row_offsets(cols[order], d_sae))
            grad_W = by_latent.T.contiguous()
        if need_x:
            grad_x = bag_sum(cols, W_enc.T.contiguous(), grad, row_offsets(rows, x_c.shape[0]))
            grad_x = grad_x.to(ctx.x_dtype)
        return grad_x, grad_b_dec, grad_W, grad_b_enc, None, None, None


class SparseEncoding(NamedTuple):
    """What the no-grad encoder pass of the sparse path found; see `sparse_encode`."""

    rows: Tensor  # [nnz] token of each selected entry, sorted
    cols: Tensor  # [nnz] latent of each selected entry
    values: Tensor  # [nnz] pre-activation there (detached)
    codes: Tensor  # [n_rows, d_sae] the dense codes relu(values) at (rows, cols), detached


def sparse_encode(pre: Tensor, rows: Tensor, cols: Tensor) -> SparseEncoding:
    """Gather the selected entries of the detached pre-activations `pre` [n_rows, d_sae], then reuse its
    memory for the dense codes (saves allocating, and on CPU page-faulting in, another [n_rows, d_sae])."""
    values = pre[rows, cols]
    codes = pre.zero_().index_put_((rows, cols), values.relu())
    return SparseEncoding(rows, cols, values, codes)


def select_codes(
    x: Tensor,
    b_dec: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    rows: Tensor,
    cols: Tensor,
    values: Tensor,
    n_rows: int,
) -> SparseCodes:
    """SparseCodes relu(pre[rows, cols]) with the sparse encoder backward (see `SelectedPre`); `values` are
    pre[rows, cols] computed without grad, (rows, cols) sorted by row."""
    select = kernels.select_pre if kernels.use_kernels(W_enc.device) else SelectedPre.apply
    picked = select(x, b_dec, W_enc, b_enc, rows, cols, values)
    return SparseCodes(rows, cols, picked.relu(), n_rows, W_enc.shape[1])


def per_row_entries(indices: Tensor) -> tuple[Tensor, Tensor]:
    """(rows, cols) of a per-token selection `indices [n_rows, k]`, row-major."""
    n_rows, k = indices.shape
    # expand, not repeat_interleave: on CUDA the latter sums its repeats on the host to size its output
    rows = torch.arange(n_rows, device=indices.device)[:, None].expand(n_rows, k).reshape(-1)
    return rows, indices.reshape(-1)


def flat_entries(flat_indices: Tensor, d_sae: int) -> tuple[Tensor, Tensor]:
    """(rows, cols) of indices into a flattened [n_rows, d_sae] tensor, sorted row-major."""
    flat = flat_indices.sort().values
    return flat // d_sae, flat % d_sae


def sparse_decode(codes: SparseCodes, W_dec: Tensor) -> Tensor:
    """codes @ W_dec [n_rows, d_in], gathering only the selected decoder rows (no bias)."""
    return bag_sum(codes.cols, W_dec, codes.values, row_offsets(codes.rows, codes.n_rows))


def use_sparse_path(setting: bool | None, device: torch.device) -> bool:
    """Whether to train with the sparse path: `setting` if given, else on every device.

    Measured on one CPU thread (steps of TopK, ms, dense / sparse): d_in 32, d_sae 128, batch 256, k 3:
    11-12 / 11-15 (a wash: per-call overhead dominates); d_in 64, d_sae 256, batch 1024, k 8: 40-45 / 35-36;
    d_in 576, d_sae 1152, batch 1024, k 32: 490-750 / 200-250; d_in 576, d_sae 4608, batch 1024, k 128:
    1360-1850 / 660. On CUDA it removes four of the six large matmuls. So no device is better off dense;
    `device` stays in the signature for when one is.

    Under `torch.compile` (config `compile: true`) the dense path runs whatever the setting: Dynamo does not
    trace `SelectedPre` (its forward hands on values computed under no_grad), and fuses the dense path.
    """
    del device
    if torch.compiler.is_compiling():
        return False
    return True if setting is None else setting
