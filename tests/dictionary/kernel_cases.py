"""Shared cases for the Triton kernel tests (CPU under the interpreter, and CUDA): each kernel path against
the torch reference, on the device given."""

from __future__ import annotations

import torch

from featureatlas.tasks.dictionary import kernels
from featureatlas.tasks.dictionary.sparse_decoder import SelectedPre, per_row_entries, row_offsets


def entries(n_rows: int, d_sae: int, k: int, device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) of k distinct latents per token, sorted by token; latent 1 is in every token (a latent
    shared across tokens), the last latent in none, and the last token selects nothing when k > 1 (an
    empty bag)."""
    g = torch.Generator().manual_seed(seed)
    others = torch.stack([torch.randperm(d_sae - 2, generator=g)[: k - 1] for _ in range(n_rows)])
    others += (others >= 1).long()  # 0, 2, ..., d_sae - 2: a token's k latents stay distinct
    picks = torch.cat([torch.ones(n_rows, 1, dtype=torch.long), others], dim=1)
    rows, cols = per_row_entries(picks)
    if k > 1:
        keep = rows != n_rows - 1
        rows, cols = rows[keep], cols[keep]
    return rows.to(device), cols.to(device)


def check_bag_sum(n_rows, d_sae, d_in, k, device, dtype=torch.float32, strided=False, atol=1e-5, rtol=1e-5):
    """kernels.bag_sum (forward, table and weight gradients) equals the dense float64 product."""
    rows, cols = entries(n_rows, d_sae, k, device)
    g = torch.Generator().manual_seed(1)
    if strided:  # a transposed view as the table, weights with a stride, a non-contiguous output gradient
        table = torch.randn(d_in, d_sae, generator=g).to(device, dtype).T.requires_grad_()
        weights = torch.randn(2 * rows.numel(), generator=g).to(device, dtype)[::2].requires_grad_()
        grad = torch.randn(d_in, n_rows, generator=g).to(device, dtype).T
    else:
        table = torch.randn(d_sae, d_in, generator=g).to(device, dtype).requires_grad_()
        weights = torch.randn(rows.numel(), generator=g).to(device, dtype).requires_grad_()
        grad = torch.randn(n_rows, d_in, generator=g).to(device, dtype)
    out = kernels.bag_sum(cols, table, weights, row_offsets(rows, n_rows))
    got = torch.autograd.grad(out, (table, weights), grad)

    table64 = table.detach().double().requires_grad_()
    weights64 = weights.detach().double().requires_grad_()
    dense = torch.zeros(n_rows, d_sae, dtype=torch.float64, device=device)
    dense = dense.index_put((rows, cols), weights64, accumulate=True)
    ref = dense @ table64
    expected = torch.autograd.grad(ref, (table64, weights64), grad.double())
    assert out.dtype == dtype and got[0].dtype == dtype and got[1].dtype == dtype
    assert ref.abs().sum() > 0 and all(e.abs().sum() > 0 for e in expected)
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol)
    for name, a, e in zip(("table", "weights"), got, expected):
        torch.testing.assert_close(a.double(), e, atol=atol, rtol=rtol, msg=name)


def check_select_pre(n_rows, d_sae, d_in, k, device, atol=1e-5, rtol=1e-5):
    """kernels.select_pre equals SelectedPre (which tests/dictionary/test_sparse_decoder.py checks against
    the dense Jacobian): values, and the gradients of x, b_dec, W_enc and b_enc."""
    rows, cols = entries(n_rows, d_sae, k, device, seed=2)
    g = torch.Generator().manual_seed(3)
    shapes = {"x": (n_rows, d_in), "b_dec": (d_in,), "W_enc": (d_in, d_sae), "b_enc": (d_sae,)}
    inputs = [torch.randn(*s, generator=g).to(device).requires_grad_() for s in shapes.values()]
    x, b_dec, W_enc, b_enc = inputs
    values = ((x - b_dec) @ W_enc + b_enc)[rows, cols].detach()
    grad = torch.randn(rows.numel(), generator=g).to(device)
    results = []
    for select in (kernels.select_pre, SelectedPre.apply):
        picked = select(x, b_dec, W_enc, b_enc, rows, cols, values)
        results.append((picked, *torch.autograd.grad(picked, inputs, grad)))
    for name, got, expected in zip(("values", *shapes), *results):
        assert expected.abs().sum() > 0, name
        torch.testing.assert_close(got, expected, atol=atol, rtol=rtol, msg=name)
    # latents nobody selected get exactly zero columns, though the kernel's output starts uninitialised
    unselected = torch.ones(d_sae, dtype=torch.bool, device=device)
    unselected[cols] = False
    assert unselected.any() and (results[0][3][:, unselected] == 0).all()
