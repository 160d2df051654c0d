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
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import polars as pl
import torch
from torch import Tensor, nn

from featureatlas.tasks.evaluate.metrics import dictionary_placement
from featureatlas.tasks.labeling.code_stream import CodeStream, kth_per_group, lookup, smallest_per_group
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


def _mark(strings: list[str], centre: int) -> str:
    """Join token strings, wrapping the centre one in «» with its leading whitespace left outside."""
    tok = strings[centre]
    body = tok.lstrip()
    marked = f"{tok[: len(tok) - len(body)]}«{body}»"
    return "".join(strings[:centre]) + marked + "".join(strings[centre + 1 :])


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
        return _top_contexts(
            codes, TensorRows(row_context, row_position, context_tokens), token_strings, top_k, window
        )
    finally:
        if own:
            codes.close()


def _top_contexts(codes, corpus, token_strings, top_k, window):
    top_vals, top_rows, fired, n = _stream_top_k(codes, top_k)

    # Gather every window first so the (possibly slow) token_strings runs once on the distinct ids.
    vals_list, rows_list = top_vals.tolist(), top_rows.tolist()
    kept_rows = torch.unique(top_rows[top_vals > 0])
    ctx_t, pos_t = corpus.locate(kept_rows)
    ids_all = corpus.windows(ctx_t, pos_t, window).tolist()
    windows: dict[int, tuple[int, int, list[int], int]] = {}
    for row, ctx, pos, ids in zip(kept_rows.tolist(), ctx_t.tolist(), pos_t.tolist(), ids_all):
        if ids[window] < 0:
            raise ValueError(
                f"activation row {row} points at position {pos} of context {ctx}, which holds no token; "
                "row_context/row_position must match context_tokens"
            )
        # -1 marks the end of a short context (or a position outside it): drop them from the window.
        before = [t for t in ids[:window] if t >= 0]
        after = [t for t in ids[window + 1 :] if t >= 0]
        windows[row] = (ctx, pos, [*before, ids[window], *after], len(before))
    distinct = sorted({t for *_, ids, _ in windows.values() for t in ids})
    token_acts = _window_activations(codes, corpus, vals_list, rows_list, windows)
    strings = token_strings(distinct)
    if len(strings) != len(distinct):
        raise ValueError(f"token_strings returned {len(strings)} strings for {len(distinct)} token ids")
    display = dict(zip(distinct, strings))
    # Per row, once: (context, position, max token string, marked text); a row can top several latents.
    shown = {}
    for row, (ctx, pos, ids, centre) in windows.items():
        toks = [display[t] for t in ids]
        shown[row] = (ctx, pos, toks[centre], _mark(toks, centre), toks, centre)

    records = []
    for latent, (vals, rows) in enumerate(zip(vals_list, rows_list)):
        top = [(v, r, shown[r]) for v, r in zip(vals, rows) if v > 0]
        top_tokens = [tok for _, _, (_, _, tok, *_) in top]
        contexts = [
            {
                "context": ctx,
                "position": pos,
                "activation": v,
                "text": text,
                "tokens": toks,
                "centre": centre,
                "token_activations": token_acts[latent, r],
            }
            for v, r, (ctx, pos, _, text, toks, centre) in top
        ]
        # most_common keeps first-seen order on ties, so a tie goes to the token of the strongest context.
        label, count = Counter(top_tokens).most_common(1)[0] if top_tokens else (None, 0)
        records.append(
            {
                "latent": latent,
                "frequency": int(fired[latent]) / n,
                "max_activation": vals[0],
                "label": None if label is None else json.dumps(label, ensure_ascii=False),
                "label_share": count / len(top_tokens) if top_tokens else None,
                "top_tokens": top_tokens,
                "contexts": contexts,
            }
        )
    df = pl.DataFrame(records, schema=FEATURE_TABLE_SCHEMA)
    log.info("labeled %d of %d latents from %d rows", int((fired > 0).sum()), codes.d_sae, n)
    return df


def _window_activations(codes, corpus, vals_list, rows_list, windows) -> dict[tuple[int, int], list]:
    """{(latent, row): the latent's code at each token of the row's window} for every kept top context."""
    keys, lat, ctx, pos, sizes = [], [], [], [], []
    for latent, (vals, rows) in enumerate(zip(vals_list, rows_list)):
        for v, r in zip(vals, rows):
            if v > 0:
                c, p, ids, centre = windows[r]
                keys.append((latent, r))
                sizes.append(len(ids))
                lat += [latent] * len(ids)
                ctx += [c] * len(ids)
                pos += range(p - centre, p - centre + len(ids))  # the window is contiguous in its context
    if not keys:
        return {}
    rows = corpus.rows_at(torch.tensor(ctx), torch.tensor(pos))
    got = _gather_codes(codes, rows, torch.tensor(lat)).tolist()
    out, at = {}, 0
    for key, size in zip(keys, sizes):
        out[key] = [None if v != v else v for v in got[at : at + size]]  # nan (no row) -> null
        at += size
    return out


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
