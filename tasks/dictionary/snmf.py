"""Semi-nonnegative matrix factorisation of activations, A ~ F G^T (Ding, Li & Jordan 2010).

A [d_in, n] holds one column per token; F [d_in, d_sae] is signed (each feature a combination of neurons) and
G [n, d_sae] >= 0 (how much each token uses each feature). One pass over the tokens does, in order:
    F <- A G (G^T G + 1e-6 I)^-1                       least squares, exact given G
    keep the top `sparsity` share of each column of F by magnitude, zero the rest
    rescale so G's columns have unit norm (F's columns take the inverse factor; F G^T is unchanged)
    G <- G * sqrt((P+ + G Q-) / (P- + G Q+)),  P = A^T F, Q = F^T F, X+ = (|X| + X)/2, X- = (|X| - X)/2
The multiplicative G update never raises the loss for fixed F; the rescale changes neither the loss nor which
entries a column keeps. Two things made planted recovery unreliable (on ten planted draws, sparsifying from
the first pass matched every column on 2), and both are handled here:
  * Sparsifying before G has separated the features locks columns onto mixed supports. The first
    `init_passes` passes are plain (unsparsified) semi-NMF from the SVD, k-means or random start, part of the
    initialisation; with 100 of them 5 of the 10 draws match every column at cosine > 0.99.
  * Truncating the least-squares F is not a descent step: when a column's support changes the loss can rise
    (it did on 4 of the 10 draws). A truncated F that fits the current G worse than the previous F is
    replaced by one iterative-hard-thresholding step from the previous F (gradient step 1 / lambda_max(G^T G),
    then the same truncation), which cannot raise the loss: the loss is monotone.
Sums over tokens run chunk by chunk
(`batch_size` rows), so only G (n x d_sae) and one chunk of activations are in memory at once; the cache
may be a memory-mapped tensor. The passes run on `cfg.device` (G and the sums live there, chunks of the
activations are copied in), and read back from it once or twice per pass (the loss that picks F, and the
pass's metrics), never per chunk. Training stops after `patience` passes without progress, keeping the best
iterate.

Not gradient-trained, so it brings its own `fit`, which `train_dictionary` hands the work to. `encode` is a
non-negative least-squares solve against F (the same multiplicative update, F fixed). The saved F has
unit-norm columns (rows of `W_dec`); the codes carry the magnitudes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from featureatlas.schemas.methods import SemiNMFConfig
from featureatlas.tasks.dictionary.base import Dictionary
from featureatlas.tasks.dictionary.registry import register
from featureatlas.tasks.dictionary.scaling import fit_input_scale
from featureatlas.tasks.dictionary.train import MetricsCallback, TrainResult, resolve_device

logger = logging.getLogger(__name__)

_EPS = 1e-12
_RIDGE = 1e-6


def multiplicative_update(G: Tensor, P: Tensor, Q: Tensor) -> Tensor:
    """One semi-NMF step for G [m, r] >= 0 given P = A^T F [m, r] and Q = F^T F [r, r]."""
    numer = P.clamp_min(0) + G @ (-Q).clamp_min(0)
    denom = (-P).clamp_min(0) + G @ Q.clamp_min(0)
    return G * torch.sqrt(numer / denom.clamp_min(_EPS))


def firing(codes: Tensor, share: float) -> Tensor:
    """Bool mask of the codes [..., r] at least `share` of their token's largest (`SemiNMF.active`)."""
    return codes > share * codes.amax(dim=-1, keepdim=True).clamp_min(_EPS)


def sparsify_columns(F: Tensor, share: float) -> Tensor:
    """F [d_in, r] with all but the ceil(share * d_in) largest-magnitude entries of each column zeroed."""
    keep = max(1, math.ceil(share * F.shape[0]))
    if keep >= F.shape[0]:
        return F
    idx = F.abs().topk(keep, dim=0).indices
    return torch.zeros_like(F).scatter(0, idx, F.gather(0, idx))


@register
class SemiNMF(Dictionary):
    """W_dec [d_sae, d_in] = F^T, unit-norm rows (a buffer: nothing takes gradients); scaled space."""

    method: ClassVar[str] = "snmf"
    config_cls: ClassVar[type[SemiNMFConfig]] = SemiNMFConfig
    cfg: SemiNMFConfig

    def __init__(self, cfg: SemiNMFConfig, d_in: int) -> None:
        super().__init__(cfg, d_in)
        self.register_buffer("W_dec", torch.zeros(cfg.d_sae, d_in))

    @classmethod
    def fit(
        cls,
        cfg: SemiNMFConfig,
        acts: Tensor,
        *,
        on_metrics: MetricsCallback | None = None,
        progress: bool = False,
    ) -> TrainResult:
        """Factorise acts [n, d_in] (validated by the caller); see the module docstring."""
        return fit_snmf(cfg, acts, on_metrics=on_metrics, progress=progress)

    def encode(self, acts: Tensor) -> Tensor:
        """Codes g >= 0 minimising ||x - F g|| per token, by `encode_iters` multiplicative steps."""
        x = acts.to(self.W_dec.dtype) * self.input_scale
        F = self.W_dec.T
        Q = F.T @ F
        P = x @ F
        # Start from the clipped unconstrained solution; the floor keeps every code free to grow (a
        # multiplicative update cannot move an exact zero).
        eye = torch.eye(self.d_sae, dtype=Q.dtype, device=Q.device)
        G = torch.linalg.solve(Q + _RIDGE * eye, P.reshape(-1, self.d_sae).T).T.reshape(P.shape)
        G = G.clamp_min(0) + 1e-3 * G.abs().mean()
        for _ in range(self.cfg.encode_iters):
            G = multiplicative_update(G, P, Q)
        return G

    def decode(self, codes: Tensor) -> Tensor:
        return codes @ self.W_dec / self.input_scale

    # NNLS leaves every code of G slightly above 0 (more so when features overlap), so "> 0" would call every
    # feature active on every token: a code fires when it is at least this share of its token's largest code.
    firing_share: ClassVar[float] = 0.1

    def active(self, codes: Tensor) -> Tensor:
        return firing(codes, self.firing_share)

    def decoder_directions(self) -> Tensor:
        return self.W_dec.detach()


def _chunks(
    acts: Tensor, rows: int, scale: float, device: torch.device | None = None
) -> Iterator[tuple[slice, Tensor]]:
    """(rows slice, scaled float32 chunk on `device`, default acts' own) over acts [n, d_in]."""
    for start in range(0, acts.shape[0], rows):
        sl = slice(start, start + rows)
        yield sl, acts[sl].to(device or acts.device, torch.float32, non_blocking=True) * scale


def _init_G(cfg: SemiNMFConfig, acts: Tensor, rows: int, scale: float) -> Tensor:
    """G [n, d_sae] > 0: uniform random, or the tokens' projections on the top singular directions."""
    n, d_in = acts.shape
    g = torch.Generator().manual_seed(cfg.seed)
    if cfg.init == "random":
        return torch.rand(n, cfg.d_sae, generator=g) + 1e-3
    if cfg.init == "kmeans":
        return _kmeans_G(cfg, acts, rows, scale)
    gram = torch.zeros(d_in, d_in, dtype=torch.float64)
    for _, x in _chunks(acts, rows, scale):
        gram += (x.T @ x).double()
    _, vecs = torch.linalg.eigh(gram)  # ascending eigenvalues
    top = vecs.flip(-1)[:, : cfg.d_sae].float()
    if cfg.d_sae > d_in:  # more features than dimensions: random directions for the rest
        extra = torch.randn(d_in, cfg.d_sae - d_in, generator=g)
        top = torch.cat([top, extra / extra.norm(dim=0)], dim=1)
    G = torch.empty(n, cfg.d_sae)
    for sl, x in _chunks(acts, rows, scale):
        G[sl] = x @ top
    # A singular direction's sign is arbitrary: orient each so that most of its mass is positive.
    flip = G.clamp_min(0).sum(0) < (-G).clamp_min(0).sum(0)
    G[:, flip] *= -1
    return G.clamp_min(0) + 1e-2 * G.abs().mean()


def _kmeans_G(cfg: SemiNMFConfig, acts: Tensor, rows: int, scale: float) -> Tensor:
    """Ding, Li & Jordan's start: cluster the tokens into `d_sae` groups, G = cluster indicators + 0.2.

    Mini-batch k-means (scikit-learn) sees the tokens chunk by chunk, like every other pass here, so a cache
    larger than memory can be clustered.
    """
    from sklearn.cluster import MiniBatchKMeans

    n = acts.shape[0]
    if n < cfg.d_sae:
        raise ValueError(
            f"init 'kmeans' needs at least d_sae = {cfg.d_sae} tokens to make that many clusters, got {n}; "
            "use init 'svd' or more tokens"
        )
    # each partial_fit chunk must hold at least d_sae tokens
    chunk = max(rows, cfg.d_sae)
    km = MiniBatchKMeans(n_clusters=cfg.d_sae, random_state=cfg.seed, batch_size=chunk, n_init=3)
    for _ in range(3):  # a few sweeps over the tokens: mini-batch k-means converges slowly from one
        for start in range(0, n - cfg.d_sae + 1, chunk):
            km.partial_fit((acts[start : start + chunk].to(torch.float32) * scale).numpy())
    G = torch.full((n, cfg.d_sae), 0.2)
    for sl, x in _chunks(acts, rows, scale):
        labels = torch.from_numpy(km.predict(x.numpy())).long()
        G[sl] += torch.nn.functional.one_hot(labels, cfg.d_sae).float()
    return G


class _Run(NamedTuple):
    """A fit: the best pass's loss, F and metrics, and the passes made."""

    best_loss: float
    best_F: Tensor
    best_metrics: dict[str, float]
    passes: int


class _Sums(NamedTuple):
    """The pass's sufficient statistics: A G [d_in, d_sae] and G^T G [d_sae, d_sae], float64."""

    AG: Tensor
    GtG: Tensor

    def loss_sq(self, F: Tensor, total_sq: float) -> Tensor:
        """||A - G F^T||^2 from the sums alone: ||A||^2 - 2 <F, A G> + <F^T F, G^T G> (0-dim, on device)."""
        F = F.double()
        return total_sq - 2 * (F * self.AG).sum() + ((F.T @ F) * self.GtG).sum()


def least_squares_F(acts: Tensor, G: Tensor, rows: int, scale: float) -> tuple[Tensor, _Sums]:
    """(F = A G (G^T G + ridge)^-1 [d_in, d_sae], the sums) from one pass over the tokens."""
    d_sae, device = G.shape[1], G.device
    AG = torch.zeros(acts.shape[1], d_sae, dtype=torch.float64, device=device)
    GtG = torch.zeros(d_sae, d_sae, dtype=torch.float64, device=device)
    for sl, x in _chunks(acts, rows, scale, device):
        AG += (x.T @ G[sl]).double()
        GtG += (G[sl].T @ G[sl]).double()
    eye = torch.eye(d_sae, dtype=torch.float64, device=device)
    return torch.linalg.solve(GtG + _RIDGE * eye, AG.T).T.float(), _Sums(AG, GtG)


def sparse_F(cfg: SemiNMFConfig, F_ls: Tensor, F_prev: Tensor | None, sums: _Sums, total_sq: float) -> Tensor:
    """The sparsified least-squares F, unless it fits the current G worse than the previous F does.

    Truncating the least-squares solution is not a descent step: when a column's support changes the loss
    can rise. Then one projected-gradient (iterative hard thresholding) step from the previous F is taken
    instead; with step 1 / lambda_max(G^T G) it never raises the loss, so the loss is monotone.
    """
    F = sparsify_columns(F_ls, cfg.sparsity)
    # One read-back per pass: which F fits better decides whether the eigenvalue solve is needed at all.
    if F_prev is None or bool(sums.loss_sq(F, total_sq) <= sums.loss_sq(F_prev, total_sq)):
        return F
    lipschitz = torch.linalg.eigvalsh(sums.GtG)[-1].clamp_min(_EPS)
    grad = F_prev.double() @ sums.GtG - sums.AG
    return sparsify_columns((F_prev.double() - grad / lipschitz).float(), cfg.sparsity)


def _alternate(
    cfg: SemiNMFConfig,
    acts: Tensor,
    G: Tensor,
    rows: int,
    scale: float,
    sums: tuple[float, float],
    on_metrics: MetricsCallback | None,
    progress: bool,
) -> _Run:
    """`init_passes` unsparsified passes, then the sparse alternation until patience runs out."""
    n, d_in = acts.shape
    device = G.device
    total_sq, centred_sq = sums
    for _ in range(cfg.init_passes):
        F, sums = least_squares_F(acts, G, rows, scale)
        norms = sums.GtG.diagonal().sqrt().float().clamp_min(_EPS)
        G /= norms
        F *= norms
        Q = F.T @ F
        for sl, x in _chunks(acts, rows, scale, device):
            G[sl] = multiplicative_update(G[sl], x @ F, Q)

    best_loss, best_F, best_metrics, since_progress, it = math.inf, None, {}, 0, 0
    F_prev: Tensor | None = None
    for it in tqdm(range(1, cfg.max_iters + 1), desc="fit snmf", disable=not progress):
        F_ls, sums = least_squares_F(acts, G, rows, scale)
        F = sparse_F(cfg, F_ls, F_prev, sums, total_sq)
        norms = sums.GtG.diagonal().sqrt().float().clamp_min(_EPS)
        G /= norms
        F *= norms
        Q = F.T @ F
        # Device-side sums, read back once after the pass (a read per chunk would stall the device).
        err_sq = torch.zeros((), dtype=torch.float64, device=device)
        nonzero = torch.zeros((), dtype=torch.float64, device=device)
        for sl, x in _chunks(acts, rows, scale, device):
            G[sl] = multiplicative_update(G[sl], x @ F, Q)
            err_sq += (x - G[sl] @ F.T).pow(2).sum()
            nonzero += firing(G[sl], SemiNMF.firing_share).sum()
        F_prev = F
        dead = (F.abs().sum(0) == 0).double().mean()
        err_sq, nonzero, dead = torch.stack([err_sq, nonzero, dead]).tolist()
        loss = err_sq / total_sq
        metrics = {
            "loss": loss,
            "mse": err_sq / (n * d_in) / scale**2,
            "fvu": err_sq / max(centred_sq, _EPS),
            "l0": nonzero / n,
            "dead_fraction": dead,
            "auxk_loss": 0.0,
        }
        if loss < best_loss:
            since_progress = 0 if loss < best_loss * (1 - cfg.tol) else since_progress + 1
            best_loss, best_F, best_metrics = loss, F.clone(), metrics
        else:
            since_progress += 1
        stop = since_progress >= cfg.patience
        if on_metrics is not None and (it % cfg.log_every == 0 or it == cfg.max_iters or stop):
            on_metrics(metrics, it)
        if stop:
            break
    assert best_F is not None  # max_iters >= 1 and the first pass always improves on inf
    return _Run(best_loss, best_F, best_metrics, it)


def fit_snmf(
    cfg: SemiNMFConfig,
    acts: Tensor,
    *,
    on_metrics: MetricsCallback | None = None,
    progress: bool = False,
) -> TrainResult:
    """Alternating semi-NMF on acts [n, d_in] (on CPU, or memory-mapped) on `cfg.device`; metrics after every
    pass; the best pass's F is kept."""
    n, d_in = acts.shape
    device = resolve_device(cfg.device)
    model = SemiNMF(cfg, d_in)
    scale, mean = fit_input_scale(acts, target_sq_norm=float(d_in))
    mean = mean.float()
    model.input_scale.fill_(scale)
    rows = min(cfg.batch_size, n)
    total_sq = centred_sq = 0.0
    for _, x in _chunks(acts, rows, scale):
        total_sq += x.pow(2).sum().item()
        centred_sq += (x - mean).pow(2).sum().item()
    G = _init_G(cfg, acts, rows, scale).to(device)
    run = _alternate(cfg, acts, G, rows, scale, (total_sq, centred_sq), on_metrics, progress)
    logger.info("snmf: best loss %.5f after %d passes", run.best_loss, run.passes)
    with torch.no_grad():
        model.W_dec.copy_((run.best_F / run.best_F.norm(dim=0).clamp_min(_EPS)).T.cpu())
    # The metrics of the kept (best) pass, which may precede the last one.
    return TrainResult(dictionary=model.eval(), final_metrics=run.best_metrics, steps=run.passes)
