"""Probe tables on dictionary features: a dictionary's latent activations on cached tokens, and a token class.

A probe trained on these columns asks which interpretable features interact to predict a behaviour, and the
Rashomon set asks how stable that is across equally good probes. Tokens are sampled from the cache (the
cache's own rules leave out position 0 and special tokens), encoded by the dictionary one shard at a time,
and only the `n_latents` latents most correlated with the label are kept, so the pairs stay few. The
correlations are measured on the training rows alone (the split `split_frame` will make): latents chosen with
the held-out rows' labels would flatter the held-out loss that defines the Rashomon set.
"""

from __future__ import annotations

import string
from pathlib import Path

import numpy as np
import polars as pl
import torch

from featureatlas.tasks.common.store import ActivationCache
from featureatlas.tasks.dictionary import load_dictionary
from featureatlas.tasks.interactions.data import split_rows

LABEL_COLUMN = "label"


def token_class(tokens: list[str], label: str) -> np.ndarray:
    """Whether each token (as cached, e.g. ' The') belongs to the class `label` -> bool `[n]`."""
    match label:
        case "digit":
            return np.array([t.strip().isdigit() for t in tokens])
        case "capitalized":
            return np.array([t.strip()[:1].isupper() for t in tokens])
        case "punctuation":
            stripped = [t.strip() for t in tokens]
            return np.array([bool(t) and all(c in string.punctuation for c in t) for t in stripped])
        case "space_prefixed":
            return np.array([t.startswith(" ") and bool(t.strip()) for t in tokens])
        case other if other.startswith("token:"):
            text = other.removeprefix("token:")
            return np.array([t == text for t in tokens])
        case other:
            raise ValueError(
                f"label {other!r} not understood; use digit, capitalized, punctuation, space_prefixed or "
                "'token:<text>'"
            )


def _load_rows(store: ActivationCache, hookpoint: str, rows: np.ndarray) -> torch.Tensor:
    """Activations of sorted `rows`, reading only the shards that hold them, one at a time."""
    if hookpoint not in store.hookpoints:
        raise ValueError(f"hookpoint {hookpoint!r} is not in cache {store.folder}; it has {store.hookpoints}")
    shards = store.manifest["hookpoints"][hookpoint]["shards"]
    starts = np.cumsum([0] + [int(s["rows"]) for s in shards])
    parts = []
    for k in range(len(shards)):
        inside = rows[(rows >= starts[k]) & (rows < starts[k + 1])]
        if len(inside):
            parts.append(store.read_shard(hookpoint, k)[torch.from_numpy(inside - starts[k])])
    return torch.cat(parts)


def sample_rows(store: ActivationCache, max_tokens: int, seed: int) -> np.ndarray:
    """`max_tokens` of the cache's selected rows drawn uniformly without replacement (all when fewer), in
    row order. The selection is counted per shard and only the shards holding a drawn row are read, so no
    array of every row is held."""
    selection = store.selection(None)
    n = selection.n_rows
    if n <= max_tokens:
        return selection.rows().numpy()
    # ranks in the selection: the draw `choice(every_row, ...)` makes, without the array of every row
    picks = np.sort(np.random.default_rng(seed).choice(n, max_tokens, replace=False))
    starts = np.concatenate([[0], selection.counts.cumsum(0).numpy()])
    shard_of = np.searchsorted(starts, picks, side="right") - 1
    parts = []
    for s in np.unique(shard_of):
        ranks = picks[shard_of == s] - starts[s]
        parts.append(selection.shard(int(s)).numpy()[ranks])
    return np.concatenate(parts)


def choose_latents(
    codes: torch.Tensor, y: np.ndarray, train: np.ndarray, n_latents: int, label: str
) -> list[int]:
    """The `n_latents` latents of `codes [n, d_sae]` most correlated (|r|) with the bool label `y [n]`,
    measured on the rows `train` only; latents silent there are never chosen."""
    if y[train].all() or not y[train].any():
        raise ValueError(
            f"label {label!r}: the {len(train)} training tokens hold only one class; raise "
            "`interactions.max_tokens` or choose a more frequent label"
        )
    fit_codes = codes[torch.as_tensor(train)]
    sd = fit_codes.std(0)
    yc = torch.as_tensor(y[train], dtype=torch.float64)
    cov = ((fit_codes - fit_codes.mean(0)) * (yc - yc.mean())[:, None]).mean(0)
    corr = torch.where(sd > 0, cov.abs() / (sd * yc.std() + 1e-12), torch.full_like(sd, -1.0))
    alive = int((sd > 0).sum())
    if alive < 2:
        raise ValueError(
            f"only {alive} latent(s) of the dictionary fire on the {len(train)} training tokens; a probe"
            " needs at least 2: raise `interactions.max_tokens` or use a dictionary with live latents"
        )
    return torch.argsort(corr, descending=True)[: min(n_latents, alive)].tolist()


def dictionary_frame(
    dictionary_path: str | Path,
    hookpoint: str,
    cache_path: str | Path,
    label: str,
    n_latents: int,
    max_tokens: int,
    seed: int,
    heldout: float,
) -> pl.DataFrame:
    """Columns `latent_<i>` (codes of the kept latents, most correlated first) and `label` (0/1) per token."""
    store = ActivationCache(cache_path)
    rows = sample_rows(store, max_tokens, seed)
    tokens = (
        pl.scan_parquet(store.folder / "tokens.parquet")
        .filter(pl.col("row").is_in(rows.tolist()))
        .select("token")
        .collect()["token"]
        .to_list()
    )  # the table is in row order, and so are the sampled rows
    y = token_class(tokens, label)
    if y.all() or not y.any():
        raise ValueError(
            f"label {label!r}: {int(y.sum())} of the {len(y)} sampled tokens are in the class; a probe needs "
            "both classes: choose another label or a cache whose text holds both"
        )
    sae = load_dictionary(dictionary_path)
    acts = _load_rows(store, hookpoint, rows).float()
    with torch.no_grad():
        codes = torch.cat([sae.encode(acts[i : i + 4096]) for i in range(0, len(acts), 4096)]).double()
    train, _ = split_rows(len(y), heldout, seed)  # the rows `split_frame(..., heldout, seed)` trains on
    keep = choose_latents(codes, y, train, n_latents, label)
    columns = {f"latent_{i}": codes[:, i].numpy() for i in keep}
    return pl.DataFrame(columns | {LABEL_COLUMN: y.astype(np.int64)})
