"""autograd Functions over the Triton kernels: the sparse decode and the selected pre-activations.

Both mirror the torch path of tasks.dictionary.sparse_decoder operation for operation (same inputs, same
outputs, same gradients up to summation order), so the trainer cannot tell which one ran.
"""

from __future__ import annotations

import torch
from torch import Tensor

from featureatlas.tasks.dictionary.kernels.triton_sparse import gather_sum, scatter_cols, scatter_rows
from featureatlas.tasks.dictionary.sparse_decoder import SelectedPre


def bag_of_entries(ptr: Tensor, nnz: int) -> Tensor:
    """The bag of each entry [nnz] from the bag starts `ptr` [n_bags + 1] (empty bags allowed).

    A binary search rather than `repeat_interleave`, which on CUDA reads its total back to the host.
    """
    entries = torch.arange(nnz, device=ptr.device, dtype=ptr.dtype)
    return torch.searchsorted(ptr, entries, right=True) - 1


class GatherSum(torch.autograd.Function):
    """out[b] = sum over e in [ptr[b], ptr[b+1]) of weights[e] * table[index[e]]; out [n_bags, D].

    `weights` must already have the table's dtype (the caller casts, so autograd casts the gradient back).
    Backward: the table gradient is dense (the optimizer wants one) with zero rows for unselected latents,
    built by `scatter_rows` without a dense intermediate; grad_weights[e] = <grad[bag_e], table[index_e]>.
    """

    @staticmethod
    def forward(ctx, index: Tensor, table: Tensor, weights: Tensor, ptr: Tensor) -> Tensor:
        ctx.save_for_backward(index, table, weights, ptr)
        return gather_sum(index, table, weights, ptr)

    @staticmethod
    def backward(ctx, grad: Tensor):
        index, table, weights, ptr = ctx.saved_tensors
        want_table, want_weights = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        bags = bag_of_entries(ptr, index.numel())
        grad_table, grad_weights = scatter_rows(grad, table, index, bags, weights, want_table, want_weights)
        if grad_weights is not None:
            grad_weights = grad_weights.to(weights.dtype)
        return None, grad_table, grad_weights, None


class SelectedPreKernel(SelectedPre):
    """`sparse_decoder.SelectedPre` (pre[rows, cols] of pre = (x - b_dec) @ W_enc + b_enc, the values
    computed beforehand without grad) with the W_enc and b_enc gradients from `scatter_cols`.

    With g the incoming gradient of the entries and x_c = x - b_dec: grad_W_enc[:, j] = sum of
    g_e x_c[rows_e] over the entries of latent j, written straight into W_enc's [d_in, d_sae] layout;
    grad_b_enc[j] = sum of those g_e (same pass); grad_b_dec = -W_enc @ grad_b_enc; grad_x[b] = sum of
    g_e W_enc[:, cols_e] over the entries of token b (a gather over W_enc's columns, only if x needs it).
    """

    # forward: SelectedPre's (it only saves x - b_dec, W_enc and the entries)

    @staticmethod
    def backward(ctx, grad):
        x_c, W_enc, rows, cols = ctx.saved_tensors
        need_x, need_b_dec, need_W, need_b_enc = ctx.needs_input_grad[:4]
        grad_x = grad_b_dec = grad_W = grad_b_enc = None
        grad = grad.to(torch.float32)
        if need_W or need_b_enc or need_b_dec:
            grad_W, sums = scatter_cols(x_c, rows, cols, grad, W_enc.shape[1])
            grad_W = grad_W.to(W_enc.dtype) if need_W else None
            sums = sums.to(W_enc.dtype)
            if need_b_enc:
                grad_b_enc = sums
            if need_b_dec:
                grad_b_dec = -(W_enc @ sums)
        if need_x:
            # entries are sorted by token: the bags are the tokens, the table W_enc's columns (a strided view)
            tokens = torch.arange(x_c.shape[0] + 1, device=rows.device, dtype=rows.dtype)
            ptr = torch.searchsorted(rows, tokens)
            grad_x = gather_sum(cols, W_enc.T, grad.to(W_enc.dtype), ptr).to(ctx.x_dtype)
        return grad_x, grad_b_dec, grad_W, grad_b_enc, None, None, None
