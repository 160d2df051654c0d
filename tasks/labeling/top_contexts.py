"""Top-activating contexts of every latent, and a first label read off them.

One streamed pass over the activation rows keeps, per latent, the `top_k` largest codes seen so far (each
batch's `torch.topk` merged with the running one) and a firing count, so memory stays at
[batch_size, d_sae] + [d_sae, top_k] whatever the number of rows. Afterwards each kept row is turned into a
window of text around its token, and the token that most often carries the maximum becomes the first label:
a latent whose top contexts all peak on " cat" is labeled '" cat"'. Richer (LLM-written) labels build on this.
A second pass reads the latent's code at every token of each kept window (`token_activations`), so a
dashboard can shade the whole window, not only its peak; rows missing from `acts` (e.g. an excluded first
token) get a null there.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import polars as pl
import torch
from torch import Tensor, nn

from featureatlas.tasks.evaluate.metrics import dictionary_placement
from featureatlas.tasks.labeling.code_stream import CodeStream, kth_per_group, lookup, smallest_per_group
from featureatlas.tasks.labeling.columns import marked_windows, per_latent, series
from featureatlas.tasks.labeling.corpus import TensorRows

log = logging.getLogger(__name__)

__all__ = ["FEATURE_TABLE_SCHEMA", "top_activating_contexts", "write_feature_table"]

# tokens: the window's token strings; centre: the index of the max token in them; token_activations: the
# latent's code at each of them (null where the token has no activation row).
CONTEXT_STRUCT = pl.Struct(
    {
        "context": pl.Int64,
        "position": pl.Int64,
        "activation": pl.Float64,
        "text": pl.String,
        "tokens": pl.List(pl.String),
        "centre": pl.Int64,
        "token_activations": pl.List(pl.Float64),
    }
)
# One row per latent. frequency: share of rows with code > 0; max_activation: largest code seen (contexts
# keep only codes > 0); label: the commonest max token among the top contexts, JSON-quoted so that leading
# spaces and newlines show ('" cat"'), null if the latent never fired; label_share: its share of them.
FEATURE_TABLE_SCHEMA = pl.Schema(
    {
        "latent": pl.Int64,
        "frequency": pl.Float64,
        "max_activation": pl.Float64,
        "label": pl.String,
        "label_share": pl.Float64,
        "top_tokens": pl.List(pl.String),
        "contexts": pl.List(CONTEXT_STRUCT),
    }
)


def _validate(
    acts: Tensor, row_context: Tensor, row_position: Tensor, context_tokens: Tensor, d_in: int
) -> None:
    n = acts.shape[0]
    if acts.ndim != 2 or acts.shape[1] != d_in:
        raise ValueError(f"acts must be [n, d_in] = [n, {d_in}] for this dictionary, got {list(acts.shape)}")
    if row_context.shape != (n,) or row_position.shape != (n,):
        raise ValueError(
            f"row_context {list(row_context.shape)} and row_position {list(row_position.shape)} must both be "
            f"[n] = [{n}]: one context index and one position per activation row"
        )
    if context_tokens.ndim != 2:
        raise ValueError(f"context_tokens must be [n_ctx, L], got {list(context_tokens.shape)}")
    n_ctx, length = context_tokens.shape
    if n and not (int(row_context.min()) >= 0 and int(row_context.max()) < n_ctx):
        raise ValueError(f"row_context must index context_tokens' {n_ctx} rows (0..{n_ctx - 1})")
    if n and not (int(row_position.min()) >= 0 and int(row_position.max()) < length):
        raise ValueError(f"row_position must be a position within context_tokens' length {length}")


def _stream_top_k(codes: CodeStream, top_k: int) -> tuple[Tensor, Tensor, Tensor, int]:
    """Per latent: the top_k codes `[d_sae, top_k]` (0 past its firings) and their rows, how many rows it
    fired on, and the number of rows. The running selection lives on the codes' device; the result is on
    the CPU."""
    d_sae = codes.d_sae
    dev = kept_lat = None
    n = 0
    for b in codes:
        if dev is None:
            dev = b.latents.device
            kept_lat = torch.empty(0, dtype=torch.int64, device=dev)
            kept_val, kept_row = torch.empty(0, device=dev), torch.empty(0, dtype=torch.int64, device=dev)
            fired = torch.zeros(d_sae, dtype=torch.int64, device=dev)
            floor = torch.zeros(d_sae, device=dev)  # a firing enters latent j's top_k only above floor[j]
        fired += torch.bincount(b.latents, minlength=d_sae)
        n = b.start + b.n
        enter = b.values > floor[b.latents]
        # Merge the running best with this batch's candidates and keep the top_k of each latent; the running
        # ones come first, so a tie keeps the earlier row.
        lat, val = torch.cat([kept_lat, b.latents[enter]]), torch.cat([kept_val, b.values[enter]])
        row = torch.cat([kept_row, b.rows[enter]])
        keep = smallest_per_group(lat, -val, top_k)
        kept_lat, kept_val, kept_row = lat[keep], val[keep], row[keep]
        floor = -kth_per_group(kept_lat, -kept_val, top_k, d_sae, empty=0.0)
    if dev is None:
        raise ValueError("the activation stream yielded no rows; label on at least one activation row")
    rank = torch.arange(len(kept_lat), device=dev) - torch.searchsorted(kept_lat, kept_lat)
    top_vals = torch.zeros(d_sae, top_k, device=dev)
    top_rows = torch.zeros(d_sae, top_k, dtype=torch.int64, device=dev)
    top_vals[kept_lat, rank], top_rows[kept_lat, rank] = kept_val, kept_row
    return top_vals.cpu(), top_rows.cpu(), fired.cpu(), n


def _gather_codes(codes: CodeStream, rows: Tensor, latents: Tensor) -> Tensor:
    """codes[rows[i], latents[i]] for every pair (nan where rows[i] < 0), in one pass."""
    out = torch.full((len(rows),), float("nan"))
    order = torch.argsort(rows)
    rows_s, lat_s = rows[order], latents[order]
    on = None  # the (rows, latents) wanted, moved once to the codes' device
    for b in codes:
        lo, hi = torch.searchsorted(rows_s, torch.tensor([b.start, b.start + b.n])).tolist()
        if lo < hi:
            if on is None:
                on = rows_s.to(b.rows.device), lat_s.to(b.rows.device)
            out[order[lo:hi]] = lookup(b, codes.d_sae, on[0][lo:hi], on[1][lo:hi]).cpu()
    return out


def top_activating_contexts(
    dictionary: nn.Module,
    acts: Tensor,
    row_context: Tensor,
    row_position: Tensor,
    context_tokens: Tensor,
    token_strings: Callable[[list[int]], list[str]],
    *,
    top_k: int = 10,
    window: int = 8,
    batch_size: int = 4096,
    codes: CodeStream | None = None,
) -> pl.DataFrame:
    """One row per latent (schema `FEATURE_TABLE_SCHEMA`) with its firing frequency, top contexts and label.

    `acts [n, d_in]` are activation rows; row i came from position `row_position[i]` of context
    `row_context[i]`, whose token ids are `context_tokens[row_context[i]]` (negative ids mark the end).
    `token_strings` maps token ids to display strings (e.g. `lambda ids: [tok.decode([i]) for i in ids]`).
    Only rows where a latent's code is > 0 count as its contexts; a latent that never fired gets no
    contexts and a null label. Rows to leave out (e.g. position 0) should be left out of `acts` by the caller.
    `codes`: a `CodeStream` over `acts` to share with later passes (default: one made and closed here).
    """
    if top_k < 1 or batch_size < 1 or window < 0:
        raise ValueError(
            f"need top_k >= 1, batch_size >= 1, window >= 0; got {top_k}, {batch_size}, {window}"
        )
    _validate(acts, row_context, row_position, context_tokens, dictionary.d_in)
    n = acts.shape[0]
    if n == 0:
        raise ValueError("acts has no rows; label on at least one activation row")
    own = codes is None
    if codes is None:
        device, dtype = dictionary_placement(dictionary, acts.device, acts.dtype)
        codes = CodeStream(
            dictionary,
            lambda: (acts[lo : lo + batch_size] for lo in range(0, n, batch_size)),
            device=device,
            dtype=dtype,
        )
    try:
        corpus = TensorRows(row_context, row_position, context_tokens)
        return _top_contexts(codes, corpus, token_strings, top_k, window).table
    finally:
        if own:
            codes.close()


class TopContexts(NamedTuple):
    """The top-contexts table, and its contexts as flat tensors (by latent, strongest first)."""

    table: pl.DataFrame
    latent: Tensor  # [m] int64
    context: Tensor  # [m] int64
    position: Tensor  # [m] int64
    max_activation: Tensor  # [d_sae] float32, 0 for a latent that never fired


def _top_contexts(codes, corpus, token_strings, top_k, window) -> TopContexts:
    top_vals, top_rows, fired, n = _stream_top_k(codes, top_k)
    d_sae = codes.d_sae

    # The kept (latent, rank) entries, by latent then rank; each distinct row's window is made once.
    valid = top_vals > 0
    lat_e, rank_e = valid.nonzero(as_tuple=True)
    val_e, row_e = top_vals[lat_e, rank_e], top_rows[lat_e, rank_e]
    kept_rows = torch.unique(row_e)
    ctx_u, pos_u = corpus.locate(kept_rows)
    win = corpus.windows(ctx_u, pos_u, window)
    bad = (win[:, window] < 0).nonzero().flatten()
    if len(bad):
        i = int(bad[0])
        raise ValueError(
            f"activation row {int(kept_rows[i])} points at position {int(pos_u[i])} of context "
            f"{int(ctx_u[i])}, which holds no token; row_context/row_position must match context_tokens"
        )
    shown = marked_windows(win, window, window, token_strings)
    u_e = torch.searchsorted(kept_rows, row_e)
    token_acts = _window_activations(codes, corpus, ctx_u, pos_u, shown, lat_e, u_e)
    at = pl.Series(u_e.numpy())
    contexts = pl.DataFrame(
        {
            "context": ctx_u[u_e].numpy(),
            "position": pos_u[u_e].numpy(),
            "activation": series(val_e, pl.Float64),
            "text": shown.text.gather(at),
            "tokens": shown.tokens.gather(at),
            "centre": shown.centre[u_e].numpy(),
            "token_activations": token_acts,
        },
        schema=CONTEXT_STRUCT.to_schema(),
    )
    top_tokens = shown.centre_token.gather(at)
    label, share = _top_token_labels(top_tokens, lat_e, d_sae)
    df = pl.DataFrame(
        {
            "latent": torch.arange(d_sae).numpy(),
            "frequency": (fired.double() / n).numpy(),
            "max_activation": series(top_vals[:, 0], pl.Float64),
            "label": label,
            "label_share": share,
            "top_tokens": per_latent(top_tokens, lat_e, d_sae),
            "contexts": per_latent(contexts, lat_e, d_sae),
        },
        schema=FEATURE_TABLE_SCHEMA,
    )
    log.info("labeled %d of %d latents from %d rows", int((fired > 0).sum()), d_sae, n)
    return TopContexts(df, lat_e, ctx_u[u_e], pos_u[u_e], top_vals[:, 0])


def _top_token_labels(top_tokens: pl.Series, lat_e: Tensor, d_sae: int) -> tuple[list, list]:
    """Per latent: the commonest of its top tokens (flat, by latent), JSON-quoted, ties to the one seen first
    (the token of the strongest context among them), and its share of them; None for a latent without any."""
    n_ctx = torch.bincount(lat_e, minlength=d_sae)
    if not len(lat_e):
        return [None] * d_sae, [None] * d_sae
    # equal strings count together, whatever their ids: one class per distinct string; -1 pads
    classes = top_tokens.to_frame("t").select(pl.col("t").rank("dense"))["t"].to_numpy()
    slot = torch.arange(len(lat_e)) - (n_ctx.cumsum(0) - n_ctx)[lat_e]
    cls = torch.full((d_sae, int(n_ctx.max())), -1, dtype=torch.int64)
    cls[lat_e, slot] = torch.from_numpy(classes.astype("int64"))
    count = ((cls[:, :, None] == cls[:, None, :]) & (cls[:, None, :] >= 0)).sum(2).masked_fill(cls < 0, -1)
    best = torch.argmax(count, dim=1)  # the first of the largest counts
    first = (n_ctx.cumsum(0) - n_ctx + best).tolist()
    top_count, n_list = count.gather(1, best[:, None]).flatten().tolist(), n_ctx.tolist()
    strings = top_tokens.to_list()
    label = [json.dumps(strings[first[i]], ensure_ascii=False) if k else None for i, k in enumerate(n_list)]
    share = [top_count[i] / k if k else None for i, k in enumerate(n_list)]
    return label, share


def _window_activations(codes, corpus, ctx_u, pos_u, shown, lat_e, u_e) -> pl.Series:
    """Per kept top context e: latent `lat_e[e]`'s code at each token of the window of row `u_e[e]`
    (null where the token has no activation row)."""
    if not len(lat_e):
        return pl.Series([], dtype=pl.List(pl.Float64))
    width = int(shown.length.max())
    # the window is contiguous in its context: its j-th token sits at position pos - centre + j
    j = torch.arange(width)
    inside = j < shown.length[:, None]
    where = inside.nonzero(as_tuple=True)
    rows_u = torch.full(inside.shape, -1, dtype=torch.int64)
    rows_u[where] = corpus.rows_at(ctx_u[where[0]], (pos_u - shown.centre)[where[0]] + where[1])
    wanted = inside[u_e]
    got = torch.full(wanted.shape, float("nan"))
    e, col = wanted.nonzero(as_tuple=True)
    got[e, col] = _gather_codes(codes, rows_u[u_e[e], col], lat_e[e])
    flat = series(got.flatten(), pl.Float64).fill_nan(None).reshape(tuple(got.shape))
    frame = pl.DataFrame({"acts": flat, "n": shown.length[u_e].numpy()})
    return frame.select(pl.col("acts").arr.to_list().list.head(pl.col("n")))["acts"]


def write_feature_table(df: pl.DataFrame, path: str | Path) -> Path:
    """Write `df` to Parquet at `path` atomically: a temporary file in the same folder, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            df.write_parquet(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
