"""The sparse training path of the TopK family equals the dense one: same codes, losses and gradients on
hand-set tiny weights (AuxK included), a custom backward equal to the dense Jacobian, and the decoder-row
constraint still holding after sparse steps."""

from __future__ import annotations

import pytest
import torch

from featureatlas.schemas.methods import BatchTopKConfig, MatryoshkaConfig, TopKConfig
from featureatlas.tasks.dictionary import build_dictionary
from featureatlas.tasks.dictionary.batchtopk import _above_sampled_cutoff, batch_topk_entries
from featureatlas.tasks.dictionary.sparse_decoder import (
    SelectedPre,
    SparseCodes,
    per_row_entries,
    row_offsets,
    select_codes,
    sparse_decode,
)
from tests.dictionary.test_topk import HAND_ACTS, HAND_CODES, HAND_RECON, hand_set_sae

D_IN, D_SAE = 4, 6


def hand_set(method: str):
    """d_in 4, d_sae 6, k 2: fixed weights with distinct pre-activations (no top-k ties)."""
    cfg = {
        "topk": TopKConfig(d_sae=D_SAE, k=2, device="cpu"),
        "batchtopk": BatchTopKConfig(d_sae=D_SAE, k=2, device="cpu"),
        "matryoshka": MatryoshkaConfig(d_sae=D_SAE, k=2, prefixes=(2, 4, 6), device="cpu"),
    }[method]
    sae = build_dictionary(cfg, d_in=D_IN)
    W_dec = torch.tensor(
        [
            [1.0, 0.0, 0.0, 0.0],
            [0.0, 1.0, 0.0, 0.0],
            [0.0, 0.0, 0.6, 0.8],
            [0.6, 0.0, 0.0, -0.8],
            [0.0, 0.8, -0.6, 0.0],
            [0.5, 0.5, 0.5, 0.5],
        ]
    )
    with torch.no_grad():
        sae.W_dec.copy_(W_dec)
        # An encoder that is not the decoder's transpose, so encoder and decoder gradients differ.
        sae.W_enc.copy_(W_dec.T + 0.1 * torch.arange(D_IN * D_SAE).reshape(D_IN, D_SAE).sin())
        sae.b_enc.copy_(torch.tensor([0.05, -0.1, 0.0, 0.02, -0.03, -0.2]))
        sae.b_dec.copy_(torch.tensor([0.1, -0.2, 0.0, 0.3]))
        sae.input_scale.fill_(1.5)
    return sae.train()


ACTS = torch.tensor(
    [
        [1.0, 0.5, -0.3, 0.2],
        [-0.4, 1.2, 0.7, 0.1],
        [0.3, -0.8, 0.9, 1.1],
        [0.9, 0.2, 0.4, -0.6],
        [-0.7, -0.3, 0.2, 0.8],
    ]
)


def step(sae, sparse: bool, dead: torch.Tensor):
    sae.sparse_decoder = sparse
    sae.zero_grad(set_to_none=True)
    out = sae.training_loss(ACTS, dead)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in sae.named_parameters()}
    return out, grads


@pytest.mark.parametrize("method", ["topk", "batchtopk", "matryoshka"])
@pytest.mark.parametrize("n_dead", [0, 3])
def test_sparse_and_dense_paths_agree(method, n_dead):
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[D_SAE - n_dead :] = True  # AuxK is active when some latents count as dead
    dense_out, dense_grads = step(hand_set(method), False, dead)
    sparse_out, sparse_grads = step(hand_set(method), True, dead)
    torch.testing.assert_close(sparse_out.codes, dense_out.codes)
    for field in ("loss", "mse", "fvu", "auxk_loss"):
        torch.testing.assert_close(getattr(sparse_out, field), getattr(dense_out, field))
    assert (dense_out.auxk_loss > 0) == (n_dead > 0)
    assert set(sparse_grads) == {"W_enc", "b_enc", "W_dec", "b_dec"}
    for name, grad in dense_grads.items():
        assert grad.abs().sum() > 0, f"{name}: a zero gradient would make the comparison vacuous"
        torch.testing.assert_close(sparse_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_batchtopk_threshold_moves_the_same_on_both_paths():
    dense, sparse = hand_set("batchtopk"), hand_set("batchtopk")
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    step(dense, False, dead)
    step(sparse, True, dead)
    assert dense.threshold > 0
    torch.testing.assert_close(sparse.threshold, dense.threshold)


def test_sparse_path_gives_the_hand_worked_codes():
    # hand_set_sae / HAND_* from test_topk: codes (1, 0, 0, 0.9) and (0.5, 0, 0, 0), whose reconstructions
    # minus b_dec are HAND_RECON - (1, 0, 0).
    sae = hand_set_sae()
    pre = (HAND_ACTS - sae.b_dec.detach()) @ sae.W_enc.detach() + sae.b_enc.detach()
    rows, cols = per_row_entries(pre.topk(2).indices)
    codes = select_codes(HAND_ACTS, sae.b_dec, sae.W_enc, sae.b_enc, rows, cols, pre[rows, cols], 2)
    torch.testing.assert_close(codes.dense(), HAND_CODES)
    torch.testing.assert_close(sparse_decode(codes, sae.W_dec), HAND_RECON - torch.tensor([1.0, 0, 0]))


def test_selected_pre_backward_equals_the_dense_jacobian():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    b_dec = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    W_enc = torch.randn(4, 7, generator=g, dtype=torch.float64, requires_grad=True)
    b_enc = torch.randn(7, generator=g, dtype=torch.float64, requires_grad=True)
    # Row 2 selects nothing, latent 6 is never selected, and (0, 3) appears beside (0, 1).
    rows = torch.tensor([0, 0, 1, 1, 3, 4, 4])
    cols = torch.tensor([1, 3, 0, 5, 1, 2, 4])

    def dense(x, b_dec, W_enc, b_enc):
        return ((x - b_dec) @ W_enc + b_enc)[rows, cols]

    def sparse(x, b_dec, W_enc, b_enc):
        values = dense(x, b_dec, W_enc, b_enc).detach()
        return SelectedPre.apply(x, b_dec, W_enc, b_enc, rows, cols, values)

    # The values enter detached, so every derivative of `sparse` comes from SelectedPre.backward alone; it
    # must equal autograd's through the dense pre-activations, for all four inputs.
    inputs = (x, b_dec, W_enc, b_enc)
    expected = torch.autograd.functional.jacobian(dense, inputs)
    got = torch.autograd.functional.jacobian(sparse, inputs)
    for e, s in zip(expected, got):
        assert e.abs().sum() > 0
        torch.testing.assert_close(s, e)


@pytest.mark.parametrize("hot_row", [False, True])
def test_batch_topk_entries_equal_the_flat_top_k(hot_row):
    g = torch.Generator().manual_seed(1)
    pre = torch.randn(16, 64, generator=g, dtype=torch.float64)
    if hot_row:  # token 3 outranks every other: its 2k = 4 candidates are not enough, so all its entries join
        pre[3] += 100.0
    rows, cols = batch_topk_entries(pre, k=2)
    flat = pre.flatten().topk(32).indices
    assert sorted(zip(rows.tolist(), cols.tolist())) == sorted((int(i) // 64, int(i) % 64) for i in flat)
    assert rows.tolist() == sorted(rows.tolist())
    assert (rows == 3).sum() == (32 if hot_row else (rows == 3).sum())


@pytest.mark.parametrize("layout", ["random", "sample_sees_only_the_tail"])
def test_batch_topk_entries_from_a_sampled_cutoff_are_exact(layout):
    # 512 x 1024 entries: large enough for the sampled cut-off (a sample of 65,536, every 8th entry)
    g = torch.Generator().manual_seed(2)
    pre = torch.randn(512, 1024, generator=g)
    if layout == "sample_sees_only_the_tail":
        # the strided sample holds only large values, so its cut-off is far too high and too few entries
        # pass it: the per-token candidates must take over, with the same answer
        pre.view(-1)[::8] += 50.0
    assert (_above_sampled_cutoff(pre, k=8) is None) == (layout != "random")
    rows, cols = batch_topk_entries(pre, k=8)
    flat = pre.flatten().topk(8 * 512).indices
    assert sorted(zip(rows.tolist(), cols.tolist())) == sorted((int(i) // 1024, int(i) % 1024) for i in flat)
    assert rows.tolist() == sorted(rows.tolist())


def test_sparse_decode_with_empty_rows_matches_dense():
    W_dec = torch.randn(6, 3, dtype=torch.float64)
    codes = SparseCodes(
        rows=torch.tensor([0, 0, 2]),
        cols=torch.tensor([4, 1, 4]),
        values=torch.tensor([0.5, 2.0, -1.0], dtype=torch.float64),
        n_rows=4,
        d_sae=6,
    )
    torch.testing.assert_close(sparse_decode(codes, W_dec), codes.dense() @ W_dec)
    assert row_offsets(codes.rows, 4).tolist() == [0, 2, 2, 3]


@pytest.mark.parametrize("method", ["topk", "matryoshka"])
def test_decoder_constraint_holds_on_the_sparse_path(method):
    sae = hand_set(method)
    sae.sparse_decoder = True
    optimizer = torch.optim.AdamW(sae.parameters(), lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad(set_to_none=True)
        sae.training_loss(ACTS, torch.zeros(D_SAE, dtype=torch.bool)).loss.backward()
        sae.before_optimizer_step()
        # The gradient along each decoder row is gone, as on the dense path.
        torch.testing.assert_close(
            (sae.W_dec.grad * sae.W_dec).sum(-1), torch.zeros(D_SAE), atol=1e-6, rtol=0
        )
        optimizer.step()
        sae.after_optimizer_step()
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(D_SAE), atol=1e-6, rtol=0)
