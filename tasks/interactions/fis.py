"""Losses, permutation importance and feature interaction scores (FIS), batched over models.

A model of the input-scaling class is `g_m(X) = f(X * m)`; since scaling and row permutation commute, every
score of `g_m` is computed on `Z = X * m`. `phi_S(g)` is the mean, over permutations, of the loss increase
when the columns in `S` are permuted *together* (one row permutation applied to all of them, so each row keeps
its own combination of the values of `S`); `FIS_ij = phi_ij - phi_i - phi_j`. The same permutations serve
`phi_i`, `phi_j` and `phi_ij` (common random numbers), so sampling noise largely cancels in the difference.
(The paper's reference code shuffles each column of `S` on its own; moving them together keeps the joint
distribution of the pair, so `phi_ij` measures only what the pair carries about the target jointly.)

Each permutation `k` gives its own `FIS_ij,k`; the score is their mean and its Monte-Carlo standard error is
`sd_k(FIS_ij,k) / sqrt(K)`. The reference implementation of the paper averages 30 shuffles; permutations are
processed in chunks sized to a memory budget (`MEMORY_ELEMENTS`), so 30 or 100 of them cost no more memory
than a few.

Models whose first step is affine (`Layered`: logistic/ridge regression, the torch MLP) take a faster path.
Permuting columns `S` of `Z` changes the first layer's pre-activations by `(Z[perm, S] - Z[:, S]) W[:, S]^T`,
a rank-|S| update, and scaling by `m` is `W * m`; so every model, set and permutation costs `n * h` instead
of `n * p * h`, and the whole batch is one tensor expression.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

Predictor = Callable[[torch.Tensor], torch.Tensor]
"""Any fitted model: inputs `[N, p]` -> predictions `[N]` (regression, binary P(y=1)) or `[N, C]`."""
LossName = Literal["log_loss", "mse"]
_CLIP = 1e-7
MEMORY_ELEMENTS = 2**22
"""Largest intermediate tensor (elements) one chunk of permutations may build: 32 MiB in float64 (a
cloud of 170 models x 30 permutations then grows the process by about 130 MB; 4x the budget, 360 MB)."""


def perm_chunks(perms: torch.Tensor, per_perm: int) -> list[torch.Tensor]:
    """Split `perms [K, n]` into chunks whose intermediates (`per_perm` elements each) fit the budget."""
    size = max(1, MEMORY_ELEMENTS // max(1, per_perm))
    return list(perms.split(size))


class Layered:
    """A fitted model `f(Z) = head(Z @ W.T + b)`: `W [h, p]`, `b [h]`; `head` maps `[..., n, h]` to
    predictions.

    Callable like any `Predictor`; the scoring functions recognise it and use the rank-|S| update.
    """

    def __init__(self, W: torch.Tensor, b: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor]):
        if W.dim() != 2 or b.shape != (W.shape[0],):
            raise ValueError(f"Layered needs W [h, p] and b [h]; got {tuple(W.shape)} and {tuple(b.shape)}")
        self.W, self.b, self.head = W, b, head

    def __call__(self, Z: torch.Tensor) -> torch.Tensor:
        return self.head(Z @ self.W.T.to(Z.dtype) + self.b.to(Z.dtype))


def pointwise_loss(pred: torch.Tensor, y: torch.Tensor, loss: LossName) -> torch.Tensor:
    """Loss per row: `pred [..., n]` or `[..., n, C]`, `y [n]` -> `[..., n]`."""
    match loss:
        case "mse":
            return (pred - y) ** 2
        case "log_loss" if pred.shape[-1] == y.shape[0]:  # binary: pred is P(y = 1)
            p = pred.clamp(_CLIP, 1 - _CLIP)
            return -(y * p.log() + (1 - y) * (1 - p).log())
        case "log_loss":
            p = pred.clamp(_CLIP, 1.0)
            idx = y.long().expand(*pred.shape[:-1]).unsqueeze(-1)
            return -p.gather(-1, idx).squeeze(-1).log()
        case other:
            raise ValueError(f"loss {other!r} not known; use 'log_loss' or 'mse'")


def predict_batched(f: Predictor, Z: torch.Tensor) -> torch.Tensor:
    """Evaluate `f` on every leading index of `Z [..., n, p]` in one call -> `[..., n]` or `[..., n, C]`."""
    lead, (n, p) = Z.shape[:-2], Z.shape[-2:]
    out = f(Z.reshape(-1, p))
    return out.reshape(*lead, n, *out.shape[1:])


def model_losses(
    f: Predictor, X: torch.Tensor, y: torch.Tensor, M: torch.Tensor, loss: LossName
) -> torch.Tensor:
    """Mean loss of each scaling model: `X [n, p]`, `M [B, p]` -> `[B]`."""
    if isinstance(f, Layered):
        W, b = f.W.to(X.dtype), f.b.to(X.dtype)
        return pointwise_loss(f.head(torch.einsum("np,bp,hp->bnh", X, M, W) + b), y, loss).mean(-1)
    return pointwise_loss(predict_batched(f, X * M[:, None, :]), y, loss).mean(-1)


def single_feature_losses(
    f: Predictor, X: torch.Tensor, y: torch.Tensor, feat: torch.Tensor, scale: torch.Tensor, loss: LossName
) -> torch.Tensor:
    """Mean loss of the models scaling only feature `feat[a]` by `scale[a]` (all other m = 1) -> `[A]`."""
    if isinstance(f, Layered):
        W, b = f.W.to(X.dtype), f.b.to(X.dtype)
        H0 = X @ W.T + b  # [n, h], shared by every model: each one changes a single column
        u = ((scale - 1)[:, None] * X[:, feat].T)[:, :, None]  # [A, n, 1]
        # one fused pass writes H0 + u v^T for every model (no [A, n, h] temporaries)
        H = torch.baddbmm(H0.expand(len(feat), -1, -1), u, W[:, feat].T[:, None, :])
        return pointwise_loss(f.head(H), y, loss).mean(-1)
    M = torch.ones(len(feat), X.shape[1], dtype=X.dtype)
    M[torch.arange(len(feat)), feat] = scale
    return model_losses(f, X, y, M, loss)


def permute_columns(Z: torch.Tensor, cols: list[int], perm: torch.Tensor) -> torch.Tensor:
    """A copy of `Z [..., n, p]` whose columns `cols` are all reordered by the same row permutation `perm`."""
    out = Z.clone()
    out[..., cols] = Z[..., perm, :][..., cols]
    return out


def pair_fis(
    f: Predictor,
    X: torch.Tensor,
    y: torch.Tensor,
    M: torch.Tensor,
    pair: tuple[int, int],
    perms: torch.Tensor,
    loss: LossName,
    structured: bool = True,
) -> dict[str, torch.Tensor]:
    """phi_i, phi_j, phi_ij and FIS_ij of every model, all models batched, permutations in chunks.

    `M [B, p]` scalings, `perms [K, n]` row permutations. Returns tensors `[B]` keyed `loss`, `phi_i`,
    `phi_j`, `phi_ij`, `fis` and `fis_se` (Monte-Carlo standard error over the permutations; NaN for
    K = 1). A `Layered` model takes the rank-|S| path unless `structured` is False.
    """
    if structured and isinstance(f, Layered):
        return _pair_fis_layered(f, X, y, M, pair, perms, loss)
    i, j = pair
    Z = X * M[:, None, :]  # [B, n, p]
    base = pointwise_loss(predict_batched(f, Z), y, loss).mean(-1)  # [B]
    chunks = []
    for chunk in perm_chunks(perms, 3 * M.shape[0] * X.shape[0] * X.shape[1]):
        K = chunk.shape[0]
        # one copy of Z per (set, permutation), filled in place: [B, 3, K, n, p] with sets {i}, {j}, {i, j}
        stacked = Z[:, None, None].expand(-1, 3, K, -1, -1).clone()
        shuffled = Z[:, chunk][..., [i, j]]  # [B, K, n, 2]: permutation k applied to rows of columns i, j
        stacked[:, 0, ..., i] = shuffled[..., 0]
        stacked[:, 1, ..., j] = shuffled[..., 1]
        stacked[:, 2, ..., i] = shuffled[..., 0]
        stacked[:, 2, ..., j] = shuffled[..., 1]  # the same permutation on both columns: moved together
        chunks.append(pointwise_loss(predict_batched(f, stacked), y, loss).mean(-1))  # [B, 3, K]
    return _scores(base, torch.cat(chunks, -1))


def _pair_fis_layered(
    f: Layered,
    X: torch.Tensor,
    y: torch.Tensor,
    M: torch.Tensor,
    pair: tuple[int, int],
    perms: torch.Tensor,
    loss: LossName,
) -> dict[str, torch.Tensor]:
    i, j = pair
    Wm = f.W.to(X.dtype)[None] * M[:, None, :]  # [B, h, p]: scaling the input is scaling W's columns
    H0 = torch.einsum("np,bhp->bnh", X, Wm) + f.b.to(X.dtype)  # [B, n, h]
    B, (n, h) = M.shape[0], H0.shape[1:]
    Wi, Wj = Wm[:, None, None, :, i], Wm[:, None, None, :, j]  # [B, 1, 1, h]
    base = pointwise_loss(f.head(H0), y, loss).mean(-1)
    chunks = []
    for chunk in perm_chunks(perms, 3 * B * n * h):
        K = chunk.shape[0]
        D = X[chunk][..., [i, j]] - X[None, :, [i, j]]  # [K, n, 2]: what permutation k does to columns i, j
        Di, Dj = D[None, ..., 0, None], D[None, ..., 1, None]  # [1, K, n, 1]
        # [B, 3, K, n, h], sets {i}, {j}, {i, j} (both moved by the same permutation); fused in-place updates
        H = H0[:, None, None].expand(B, 3, K, n, h).clone()
        H[:, 0].addcmul_(Di, Wi)
        H[:, 1].addcmul_(Dj, Wj)
        H[:, 2].addcmul_(Di, Wi).addcmul_(Dj, Wj)
        chunks.append(pointwise_loss(f.head(H), y, loss).mean(-1))  # [B, 3, K]
    return _scores(base, torch.cat(chunks, -1))


def _scores(base: torch.Tensor, permuted: torch.Tensor) -> dict[str, torch.Tensor]:
    """`base [B]`, `permuted [B, 3, K]` (loss with {i}, {j}, {i, j} permuted, per permutation)."""
    phi = permuted - base[:, None, None]  # [B, 3, K]
    per_perm = phi[:, 2] - phi[:, 0] - phi[:, 1]  # [B, K]
    K = per_perm.shape[-1]
    se = per_perm.std(-1) / K**0.5 if K > 1 else torch.full_like(base, float("nan"))
    phi = phi.mean(-1)
    return {
        "loss": base,
        "phi_i": phi[:, 0],
        "phi_j": phi[:, 1],
        "phi_ij": phi[:, 2],
        "fis": per_perm.mean(-1),
        "fis_se": se,
    }


def importances(
    f: Predictor, X: torch.Tensor, y: torch.Tensor, perms: torch.Tensor, loss: LossName
) -> torch.Tensor:
    """phi_i of every single feature of `f`, `[p]`: one permuted copy of `X` per feature and permutation."""
    n, p = X.shape
    base = pointwise_loss(f(X), y, loss).mean()
    cols = torch.arange(p)
    increases = []
    for chunk in perm_chunks(perms, p * n * p):
        stacked = X[None, None].expand(p, chunk.shape[0], -1, -1).clone()  # [p, K, n, p]
        stacked[cols, :, :, cols] = X[chunk][:, :, cols].permute(
            2, 0, 1
        )  # feature i's copies: column i moved
        increases.append(pointwise_loss(predict_batched(f, stacked), y, loss).mean(-1))  # [p, K]
    return torch.cat(increases, -1).mean(-1) - base


def pair_fis_naive(
    f: Predictor,
    X: torch.Tensor,
    y: torch.Tensor,
    M: torch.Tensor,
    pair: tuple[int, int],
    perms: torch.Tensor,
    loss: LossName,
) -> torch.Tensor:
    """Reference implementation of `pair_fis(...)["fis"]`: a Python loop per model, set and permutation."""
    i, j = pair
    out = []
    for m in M:
        Z = X * m
        base = pointwise_loss(f(Z), y, loss).mean()
        phi = []
        for cols in ([i], [j], [i, j]):
            inc = [pointwise_loss(f(permute_columns(Z, cols, perm)), y, loss).mean() - base for perm in perms]
            phi.append(torch.stack(inc).mean())
        out.append(phi[2] - phi[0] - phi[1])
    return torch.stack(out)
